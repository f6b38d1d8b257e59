import { Badge, Box, Button, Code, HStack, NativeSelect, Stack, Table, Text, Wrap } from "@chakra-ui/react";
import { useState } from "react";

import { call } from "./api";
import { HealthBadge, StatusBadge } from "./badges";
import { ConfirmDialog } from "./ConfirmDialog";
import { age, when } from "./format";
import { HEALTHS, type AgentView, type Overview, type SentinelView } from "./types";

type Action = { kind: "drain" | "resume" | "remove"; agent: AgentView } | null;

export function AgentsTab({ overview, reload }: { overview: Overview; reload: () => void }) {
  const [health, setHealth] = useState("");
  const [queue, setQueue] = useState("");
  const [action, setAction] = useState<Action>(null);
  const canEdit = overview.permissions.can_edit;

  const queues = [...new Set(overview.agents.flatMap((a) => a.queues))].sort();
  const shown = overview.agents.filter(
    (a) => (!health || a.health === health) && (!queue || a.queues.includes(queue)),
  );

  const run = async (reason: string) => {
    if (!action) return;
    const name = encodeURIComponent(action.agent.name);
    if (action.kind === "drain") await call("POST", `/agents/${name}/drain`, { reason });
    else if (action.kind === "resume") await call("POST", `/agents/${name}/resume`);
    else {
      const live = ["healthy", "degraded", "draining"].includes(action.agent.health);
      await call("DELETE", `/agents/${name}${live ? "?force=true" : ""}`);
    }
    reload();
  };

  return (
    <Stack gap={4}>
      <HStack gap={3} wrap="wrap">
        <NativeSelect.Root size="sm" width="180px">
          <NativeSelect.Field
            aria-label="Filter by state"
            data-testid="filter-state"
            value={health}
            onChange={(e) => setHealth(e.currentTarget.value)}
          >
            <option value="">All states</option>
            {HEALTHS.map((h) => (
              <option key={h} value={h}>
                {h}
              </option>
            ))}
          </NativeSelect.Field>
          <NativeSelect.Indicator />
        </NativeSelect.Root>
        <NativeSelect.Root size="sm" width="180px">
          <NativeSelect.Field
            aria-label="Filter by queue"
            data-testid="filter-queue"
            value={queue}
            onChange={(e) => setQueue(e.currentTarget.value)}
          >
            <option value="">All queues</option>
            {queues.map((q) => (
              <option key={q} value={q}>
                {q}
              </option>
            ))}
          </NativeSelect.Field>
          <NativeSelect.Indicator />
        </NativeSelect.Root>
        <Text color="fg.muted" fontSize="sm">
          {shown.length} of {overview.agents.length} agents
        </Text>
      </HStack>

      <Box overflowX="auto">
        <Table.Root size="sm" variant="outline" data-testid="agents-table">
          <Table.Header>
            <Table.Row>
              <Table.ColumnHeader>Agent</Table.ColumnHeader>
              <Table.ColumnHeader>State</Table.ColumnHeader>
              <Table.ColumnHeader>Queues</Table.ColumnHeader>
              <Table.ColumnHeader>Slots</Table.ColumnHeader>
              <Table.ColumnHeader>Running work</Table.ColumnHeader>
              <Table.ColumnHeader>Heartbeat</Table.ColumnHeader>
              <Table.ColumnHeader>Versions</Table.ColumnHeader>
              <Table.ColumnHeader>Sentinel</Table.ColumnHeader>
              <Table.ColumnHeader>Token</Table.ColumnHeader>
              <Table.ColumnHeader>Actions</Table.ColumnHeader>
            </Table.Row>
          </Table.Header>
          <Table.Body>
            {shown.length === 0 ? (
              <Table.Row>
                <Table.Cell colSpan={10}>
                  <Text color="fg.muted">
                    {overview.agents.length === 0
                      ? "No agent has registered yet. Create a token (Tokens tab) and start an agent with it."
                      : "No agent matches these filters."}
                  </Text>
                </Table.Cell>
              </Table.Row>
            ) : null}
            {shown.map((a) => (
              <AgentRow
                key={a.name}
                agent={a}
                plane={overview.plane_versions}
                canEdit={canEdit}
                onAction={(kind) => setAction({ kind, agent: a })}
              />
            ))}
          </Table.Body>
        </Table.Root>
      </Box>
      {!canEdit ? (
        <Text color="fg.muted" fontSize="sm" data-testid="read-only-note">
          You have read access only: draining, resuming and removing agents and managing tokens need edit access on
          Configuration ({overview.permissions.user}).
        </Text>
      ) : null}

      <ConfirmDialog
        open={action?.kind === "drain"}
        title={`Drain agent ${action?.agent.name ?? ""}?`}
        body={
          <Text>
            The agent finishes what it runs and leases nothing new until it is resumed. It stays drained across
            restarts.
          </Text>
        }
        confirmLabel="Drain"
        reasonLabel="Reason"
        reasonRequired
        onConfirm={run}
        onClose={() => setAction(null)}
      />
      <ConfirmDialog
        open={action?.kind === "resume"}
        title={`Resume agent ${action?.agent.name ?? ""}?`}
        body={<Text>The agent leases work from its queues again.</Text>}
        confirmLabel="Resume"
        onConfirm={run}
        onClose={() => setAction(null)}
      />
      <ConfirmDialog
        open={action?.kind === "remove"}
        title={`Remove agent ${action?.agent.name ?? ""}?`}
        danger
        body={
          <Stack gap={2}>
            <Text>The plane forgets this agent. Work it still holds goes back to the queue or fails.</Text>
            {action && ["healthy", "degraded", "draining"].includes(action.agent.health) ? (
              <Text color="fg.warning">
                It is still live: it will register again unless its token is revoked (Tokens tab).
              </Text>
            ) : null}
          </Stack>
        }
        confirmLabel="Remove"
        onConfirm={run}
        onClose={() => setAction(null)}
      />
    </Stack>
  );
}

function AgentRow({
  agent: a,
  plane,
  canEdit,
  onAction,
}: {
  agent: AgentView;
  plane: Record<string, string>;
  canEdit: boolean;
  onAction: (kind: "drain" | "resume" | "remove") => void;
}) {
  return (
    <Table.Row data-testid={`agent-row-${a.name}`} verticalAlign="top">
      <Table.Cell>
        <Text fontWeight="semibold" whiteSpace="nowrap">
          {a.name}
        </Text>
        <Text fontSize="xs" color="fg.muted">
          {a.hostname ?? ""}
        </Text>
      </Table.Cell>
      <Table.Cell>
        <Stack gap={1} maxW="260px" align="flex-start">
          <HealthBadge health={a.health} />
          {a.health_reasons.map((r) => (
            <Text key={r} fontSize="xs" color="fg.muted">
              {r}
            </Text>
          ))}
          {a.drained ? (
            <Box data-testid="drain-reason" fontSize="xs" borderLeftWidth="2px" borderColor="purple.solid" pl={2}>
              <Text fontWeight="semibold">Drained{a.drained_by ? ` by ${a.drained_by}` : ""}</Text>
              <Text>{a.drain_reason || "(no reason given)"}</Text>
              <Text color="fg.muted">{when(a.drained_at)}</Text>
            </Box>
          ) : null}
        </Stack>
      </Table.Cell>
      <Table.Cell>
        <Wrap gap={1}>
          {a.queues.map((q) => (
            <Badge key={q} variant="outline" data-testid="agent-queue">
              {q}
            </Badge>
          ))}
        </Wrap>
      </Table.Cell>
      <Table.Cell data-testid="agent-slots" whiteSpace="nowrap">
        {a.slots_used} / {a.concurrency}
      </Table.Cell>
      <Table.Cell>
        {a.running.length === 0 ? (
          <Text color="fg.muted">-</Text>
        ) : (
          <Stack gap={0} fontSize="xs" maxW="280px">
            {a.running.map((w) => (
              <Text key={w.id} truncate title={w.label}>
                <StatusBadge status={w.state} /> {w.label}
              </Text>
            ))}
          </Stack>
        )}
      </Table.Cell>
      <Table.Cell whiteSpace="nowrap" title={when(a.last_heartbeat_at)}>
        {age(a.heartbeat_age)}
      </Table.Cell>
      <Table.Cell>
        <Stack gap={0} fontSize="xs" data-testid="agent-versions">
          {Object.entries(a.versions).map(([k, v]) => {
            const differs = a.version_mismatch.includes(k);
            return (
              <Text
                key={k}
                whiteSpace="nowrap"
                color={differs ? "fg.warning" : undefined}
                fontWeight={differs ? "semibold" : undefined}
                title={differs ? `The plane runs ${plane[k] ?? "?"}` : undefined}
                data-testid={differs ? "version-mismatch" : undefined}
              >
                {k} {v}
                {differs ? ` ≠ plane ${plane[k] ?? "?"}` : ""}
              </Text>
            );
          })}
        </Stack>
      </Table.Cell>
      <Table.Cell>
        {a.sentinel ? <Sentinel sentinel={a.sentinel} /> : (
          <Text color="fg.muted" fontSize="xs">
            no report
          </Text>
        )}
      </Table.Cell>
      <Table.Cell>
        {a.token_id ? (
          <Stack gap={1} align="flex-start">
            <Code fontSize="xs">{a.token_id}</Code>
            {a.token_status ? <StatusBadge status={a.token_status} /> : null}
          </Stack>
        ) : (
          "-"
        )}
      </Table.Cell>
      <Table.Cell>
        <HStack gap={1}>
          {a.drained ? (
            <Button size="xs" variant="outline" disabled={!canEdit} onClick={() => onAction("resume")}>
              Resume
            </Button>
          ) : (
            <Button size="xs" variant="outline" disabled={!canEdit} onClick={() => onAction("drain")}>
              Drain
            </Button>
          )}
          <Button size="xs" variant="outline" colorPalette="red" disabled={!canEdit} onClick={() => onAction("remove")}>
            Remove
          </Button>
        </HStack>
      </Table.Cell>
    </Table.Row>
  );
}

function Sentinel({ sentinel }: { sentinel: SentinelView }) {
  const [all, setAll] = useState(false);
  const notable = sentinel.checks.filter((c) => !c.skipped && (!c.ok || c.warning));
  const rest = sentinel.checks.filter((c) => !notable.includes(c));
  const shown = all ? sentinel.checks : notable;
  return (
    <Stack gap={0} fontSize="xs" maxW="320px" align="flex-start" data-testid="agent-sentinel">
      <HStack gap={1}>
        <StatusBadge status={sentinel.status} />
        <Text color={sentinel.stale ? "fg.warning" : "fg.muted"}>
          {age(sentinel.age)}
          {sentinel.stale ? " (stale)" : ""}
        </Text>
      </HStack>
      {shown.map((c) => (
        <Text
          key={c.name}
          data-testid="sentinel-check"
          color={c.skipped ? "fg.muted" : !c.ok ? "fg.error" : c.warning ? "fg.warning" : undefined}
          title={c.hint || undefined}
        >
          {c.skipped ? "–" : c.ok ? (c.warning ? "!" : "✓") : "✗"} {c.name}
          {c.detail ? `: ${c.detail}` : ""}
        </Text>
      ))}
      {rest.length ? (
        <Button size="2xs" variant="plain" px={0} color="fg.muted" onClick={() => setAll(!all)}>
          {all ? "hide passing checks" : `+ ${rest.length} passing or skipped`}
        </Button>
      ) : null}
    </Stack>
  );
}
