import {
  Alert,
  Badge,
  Box,
  Button,
  Clipboard,
  CloseButton,
  Code,
  Dialog,
  Field,
  HStack,
  Input,
  NativeSelect,
  Portal,
  Stack,
  Table,
  Text,
  Wrap,
} from "@chakra-ui/react";
import { useState, type ReactNode } from "react";

import { call, planeUrl, usePoll } from "./api";
import { StatusBadge } from "./badges";
import { ConfirmDialog } from "./ConfirmDialog";
import { when } from "./format";
import type { TokenCreated, TokenView } from "./types";

const split = (text: string) =>
  text
    .split(/[\s,]+/)
    .map((s) => s.trim())
    .filter(Boolean);

export function TokensTab({ canEdit }: { canEdit: boolean }) {
  const tokens = usePoll<TokenView[]>("/tokens", 10000);
  const [creating, setCreating] = useState(false);
  const [created, setCreated] = useState<TokenCreated | null>(null);
  const [rotating, setRotating] = useState<TokenView | null>(null);
  const [revoking, setRevoking] = useState<TokenView | null>(null);

  if (tokens.error && !tokens.data) {
    return (
      <Alert.Root status="error">
        <Alert.Indicator />
        <Alert.Title>Tokens: {tokens.error.message}</Alert.Title>
      </Alert.Root>
    );
  }

  return (
    <Stack gap={4}>
      <HStack>
        <Button size="sm" colorPalette="blue" disabled={!canEdit} onClick={() => setCreating(true)}>
          Create token
        </Button>
        <Text color="fg.muted" fontSize="sm">
          Only a hash of each token is stored; a new token is shown once.
        </Text>
      </HStack>
      {created ? <NewToken created={created} onDone={() => setCreated(null)} /> : null}
      <Box overflowX="auto">
        <Table.Root size="sm" variant="outline" data-testid="tokens-table">
          <Table.Header>
            <Table.Row>
              <Table.ColumnHeader>Token id</Table.ColumnHeader>
              <Table.ColumnHeader>Agent</Table.ColumnHeader>
              <Table.ColumnHeader>Queues</Table.ColumnHeader>
              <Table.ColumnHeader>Bundles</Table.ColumnHeader>
              <Table.ColumnHeader>Created</Table.ColumnHeader>
              <Table.ColumnHeader>Expires</Table.ColumnHeader>
              <Table.ColumnHeader>Last used</Table.ColumnHeader>
              <Table.ColumnHeader>State</Table.ColumnHeader>
              <Table.ColumnHeader>Actions</Table.ColumnHeader>
            </Table.Row>
          </Table.Header>
          <Table.Body>
            {(tokens.data ?? []).map((t) => (
              <Table.Row key={t.id} data-testid={`token-row-${t.id}`} verticalAlign="top">
                <Table.Cell>
                  <Code fontSize="xs">{t.id}</Code>
                  {t.description ? (
                    <Text fontSize="xs" color="fg.muted">
                      {t.description}
                    </Text>
                  ) : null}
                </Table.Cell>
                <Table.Cell>{t.agent_name}</Table.Cell>
                <Table.Cell>
                  <Wrap gap={1}>
                    {t.queues.map((q) => (
                      <Badge key={q} variant="outline">
                        {q}
                      </Badge>
                    ))}
                  </Wrap>
                </Table.Cell>
                <Table.Cell>{t.bundles.length ? t.bundles.join(", ") : <Text color="fg.muted">none</Text>}</Table.Cell>
                <Table.Cell whiteSpace="nowrap">{when(t.created_at)}</Table.Cell>
                <Table.Cell whiteSpace="nowrap">{t.expires_at ? when(t.expires_at) : "never"}</Table.Cell>
                <Table.Cell whiteSpace="nowrap">{t.last_used_at ? when(t.last_used_at) : "never"}</Table.Cell>
                <Table.Cell>
                  <StatusBadge status={t.status} testId="token-status" />
                </Table.Cell>
                <Table.Cell>
                  <HStack gap={1}>
                    <Button
                      size="xs"
                      variant="outline"
                      disabled={!canEdit || t.status !== "active"}
                      onClick={() => setRotating(t)}
                    >
                      Rotate
                    </Button>
                    <Button
                      size="xs"
                      variant="outline"
                      colorPalette="red"
                      disabled={!canEdit || t.status === "revoked"}
                      onClick={() => setRevoking(t)}
                    >
                      Revoke
                    </Button>
                  </HStack>
                </Table.Cell>
              </Table.Row>
            ))}
          </Table.Body>
        </Table.Root>
      </Box>

      <CreateDialog
        open={creating}
        onClose={() => setCreating(false)}
        onCreated={(c) => {
          setCreated(c);
          tokens.reload();
        }}
      />
      <RotateDialog
        token={rotating}
        onClose={() => setRotating(null)}
        onCreated={(c) => {
          setCreated(c);
          tokens.reload();
        }}
      />
      <ConfirmDialog
        open={revoking !== null}
        title={`Revoke token ${revoking?.id ?? ""}?`}
        danger
        body={
          <Text>
            Agent <b>{revoking?.agent_name}</b> is refused from its next request with this token on (it keeps running
            work it already started and waits for a new token in its token file).
          </Text>
        }
        confirmLabel="Revoke"
        onConfirm={async () => {
          await call("DELETE", `/tokens/${revoking?.id}`);
          tokens.reload();
        }}
        onClose={() => setRevoking(null)}
      />
    </Stack>
  );
}

function NewToken({ created, onDone }: { created: TokenCreated; onDone: () => void }) {
  const secretName = `airflow-agent-${created.info.agent_name.toLowerCase().replace(/[^a-z0-9-]/g, "-")}`;
  const secret = [
    "apiVersion: v1",
    "kind: Secret",
    "metadata:",
    `  name: ${secretName}`,
    "type: Opaque",
    "stringData:",
    `  token: ${created.token}`,
  ].join("\n");
  const config = [
    "[remote_execution]",
    `api_url = ${planeUrl()}`,
    "token_file = /var/run/secrets/airflow-agent/token",
    "",
    "# mount the Secret's `token` key there, e.g. in the agent's Pod spec:",
    "#   volumes: [{name: agent-token, secret: {secretName: " + secretName + "}}]",
    "#   volumeMounts: [{name: agent-token, mountPath: /var/run/secrets/airflow-agent, readOnly: true}]",
  ].join("\n");
  return (
    <Alert.Root status="success" data-testid="new-token" alignItems="flex-start">
      <Alert.Indicator />
      <Alert.Content gap={3} minW={0} flex="1">
        <Alert.Title>
          Token {created.info.id} for agent {created.info.agent_name}: copy it now, it is not shown again.
        </Alert.Title>
        <Clipboard.Root value={created.token}>
          <HStack>
            <Code data-testid="new-token-value" p={2} fontSize="sm" wordBreak="break-all">
              {created.token}
            </Code>
            <Clipboard.Trigger asChild>
              <Button size="xs" variant="surface" data-testid="copy-token">
                <Clipboard.Indicator copied="Copied">Copy</Clipboard.Indicator>
              </Button>
            </Clipboard.Trigger>
          </HStack>
        </Clipboard.Root>
        <Snippet title="Kubernetes Secret" text={secret} testId="snippet-secret" />
        <Snippet title="Agent configuration (airflow.cfg)" text={config} testId="snippet-config" />
        <Box>
          <Button size="xs" variant="outline" onClick={onDone}>
            I stored it, hide it
          </Button>
        </Box>
      </Alert.Content>
    </Alert.Root>
  );
}

function Snippet({ title, text, testId }: { title: string; text: string; testId: string }) {
  return (
    <Stack gap={1}>
      <HStack justify="space-between">
        <Text fontWeight="semibold" fontSize="sm">
          {title}
        </Text>
        <Clipboard.Root value={text}>
          <Clipboard.Trigger asChild>
            <Button size="xs" variant="surface">
              <Clipboard.Indicator copied="Copied">Copy</Clipboard.Indicator>
            </Button>
          </Clipboard.Trigger>
        </Clipboard.Root>
      </HStack>
      <Box
        as="pre"
        data-testid={testId}
        fontSize="xs"
        p={3}
        borderRadius="md"
        bg="bg.muted"
        overflowX="auto"
        whiteSpace="pre"
      >
        {text}
      </Box>
    </Stack>
  );
}

function FormDialog({
  open,
  title,
  submitLabel,
  busy,
  error,
  onSubmit,
  onClose,
  children,
}: {
  open: boolean;
  title: string;
  submitLabel: string;
  busy: boolean;
  error: string | null;
  onSubmit: () => void;
  onClose: () => void;
  children: ReactNode;
}) {
  return (
    <Dialog.Root open={open} onOpenChange={(e) => !e.open && onClose()} size="md">
      <Portal>
        <Dialog.Backdrop />
        <Dialog.Positioner>
          <Dialog.Content data-testid="token-dialog">
            <form
              onSubmit={(e) => {
                e.preventDefault();
                onSubmit();
              }}
            >
              <Dialog.Header>
                <Dialog.Title>{title}</Dialog.Title>
              </Dialog.Header>
              <Dialog.Body>
                <Stack gap={4}>{children}</Stack>
                {error ? (
                  <Text mt={3} color="fg.error" data-testid="token-dialog-error">
                    {error}
                  </Text>
                ) : null}
              </Dialog.Body>
              <Dialog.Footer>
                <Button variant="outline" onClick={onClose}>
                  Cancel
                </Button>
                <Button type="submit" colorPalette="blue" loading={busy} data-testid="token-dialog-submit">
                  {submitLabel}
                </Button>
              </Dialog.Footer>
            </form>
            <Dialog.CloseTrigger asChild>
              <CloseButton size="sm" />
            </Dialog.CloseTrigger>
          </Dialog.Content>
        </Dialog.Positioner>
      </Portal>
    </Dialog.Root>
  );
}

const EXPIRIES = [
  ["", "never"],
  ["1d", "1 day"],
  ["30d", "30 days"],
  ["90d", "90 days"],
  ["365d", "1 year"],
];

function CreateDialog({
  open,
  onClose,
  onCreated,
}: {
  open: boolean;
  onClose: () => void;
  onCreated: (c: TokenCreated) => void;
}) {
  const [name, setName] = useState("");
  const [queues, setQueues] = useState("default");
  const [bundles, setBundles] = useState("");
  const [expires, setExpires] = useState("90d");
  const [description, setDescription] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);

  const close = () => {
    setName("");
    setQueues("default");
    setBundles("");
    setExpires("90d");
    setDescription("");
    setError(null);
    setBusy(false);
    onClose();
  };
  const submit = async () => {
    setBusy(true);
    setError(null);
    try {
      const created = await call<TokenCreated>("POST", "/tokens", {
        agent_name: name.trim(),
        queues: split(queues),
        bundles: split(bundles).length ? split(bundles) : null,
        expires_in: expires || null,
        description: description.trim() || null,
      });
      onCreated(created);
      close();
    } catch (e) {
      setError((e as Error).message);
      setBusy(false);
    }
  };

  return (
    <FormDialog
      open={open}
      title="Create an agent token"
      submitLabel="Create"
      busy={busy}
      error={error}
      onSubmit={submit}
      onClose={close}
    >
      <Field.Root required>
        <Field.Label>
          Agent name <Field.RequiredIndicator />
        </Field.Label>
        <Input data-testid="token-agent-name" value={name} onChange={(e) => setName(e.target.value)} placeholder="cluster-eu-1" />
        <Field.HelperText>The token is bound to this agent name.</Field.HelperText>
      </Field.Root>
      <Field.Root required>
        <Field.Label>
          Queues <Field.RequiredIndicator />
        </Field.Label>
        <Input data-testid="token-queues" value={queues} onChange={(e) => setQueues(e.target.value)} placeholder="default, gpu" />
        <Field.HelperText>Comma-separated; the agent may serve these and no others.</Field.HelperText>
      </Field.Root>
      <Field.Root>
        <Field.Label>DAG bundles</Field.Label>
        <Input value={bundles} onChange={(e) => setBundles(e.target.value)} placeholder="(none)" />
        <Field.HelperText>Only for an agent that also parses DAGs: the bundles it may write.</Field.HelperText>
      </Field.Root>
      <Field.Root>
        <Field.Label>Expires in</Field.Label>
        <NativeSelect.Root size="sm">
          <NativeSelect.Field data-testid="token-expires" value={expires} onChange={(e) => setExpires(e.currentTarget.value)}>
            {EXPIRIES.map(([value, label]) => (
              <option key={value} value={value}>
                {label}
              </option>
            ))}
          </NativeSelect.Field>
          <NativeSelect.Indicator />
        </NativeSelect.Root>
      </Field.Root>
      <Field.Root>
        <Field.Label>Description</Field.Label>
        <Input value={description} onChange={(e) => setDescription(e.target.value)} maxLength={1000} />
      </Field.Root>
    </FormDialog>
  );
}

function RotateDialog({
  token,
  onClose,
  onCreated,
}: {
  token: TokenView | null;
  onClose: () => void;
  onCreated: (c: TokenCreated) => void;
}) {
  const [overlap, setOverlap] = useState("1h");
  const [expires, setExpires] = useState("90d");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);

  const close = () => {
    setOverlap("1h");
    setExpires("90d");
    setError(null);
    setBusy(false);
    onClose();
  };
  const submit = async () => {
    setBusy(true);
    setError(null);
    try {
      const created = await call<TokenCreated>("POST", `/tokens/${token?.id}/rotate`, {
        old_valid_for: overlap.trim() || null,
        expires_in: expires || null,
      });
      onCreated(created);
      close();
    } catch (e) {
      setError((e as Error).message);
      setBusy(false);
    }
  };

  return (
    <FormDialog
      open={token !== null}
      title={`Rotate token ${token?.id ?? ""} of ${token?.agent_name ?? ""}`}
      submitLabel="Rotate"
      busy={busy}
      error={error}
      onSubmit={submit}
      onClose={close}
    >
      <Text>A new token for the same agent, queues and bundles. The old one keeps working during the overlap.</Text>
      <Field.Root>
        <Field.Label>Old token stays valid for</Field.Label>
        <Input data-testid="rotate-overlap" value={overlap} onChange={(e) => setOverlap(e.target.value)} placeholder="1h" />
        <Field.HelperText>e.g. 15m, 1h, 1d; empty: until it expires or is revoked.</Field.HelperText>
      </Field.Root>
      <Field.Root>
        <Field.Label>New token expires in</Field.Label>
        <NativeSelect.Root size="sm">
          <NativeSelect.Field value={expires} onChange={(e) => setExpires(e.currentTarget.value)}>
            {EXPIRIES.map(([value, label]) => (
              <option key={value} value={value}>
                {label}
              </option>
            ))}
          </NativeSelect.Field>
          <NativeSelect.Indicator />
        </NativeSelect.Root>
      </Field.Root>
    </FormDialog>
  );
}
