import { Alert, Box, Heading, HStack, Spinner, Stack, Tabs, Text } from "@chakra-ui/react";
import { useState } from "react";

import { usePoll } from "./api";
import { AgentsTab } from "./AgentsTab";
import { QueuesTab } from "./QueuesTab";
import { TokensTab } from "./TokensTab";
import type { Overview } from "./types";

export const REFRESH_MS = 5000;

/** The "Remote Agents" page (nav): agents, queues and tokens; refreshes every 5 s. */
export function RemoteAgentsPage() {
  const overview = usePoll<Overview>("/overview", REFRESH_MS);
  const [tab, setTab] = useState("agents");

  if (overview.error && !overview.data) {
    return (
      <Alert.Root status="error" m={4} data-testid="page-error">
        <Alert.Indicator />
        <Alert.Title>Remote Agents: {overview.error.message}</Alert.Title>
      </Alert.Root>
    );
  }
  if (!overview.data) return <Spinner m={4} />;
  const data = overview.data;
  const unserved = data.queues.filter((q) => q.warning);

  return (
    <Box p={2} data-testid="remote-agents-page">
      <Stack gap={4}>
        <HStack justify="space-between" wrap="wrap">
          <Heading size="lg">Remote Agents</Heading>
          <Text fontSize="xs" color={overview.error ? "fg.error" : "fg.muted"} data-testid="refreshed">
            {overview.error
              ? `Refresh failed: ${overview.error.message}`
              : `Refreshes every ${REFRESH_MS / 1000} s · plane: Airflow ${data.plane_versions.airflow ?? "?"}, airflow-remote-execution ${data.plane_versions["airflow-remote-execution"] ?? "?"}`}
          </Text>
        </HStack>
        {unserved.length ? (
          <Alert.Root status="warning" data-testid="unserved-warning">
            <Alert.Indicator />
            <Alert.Content>
              <Alert.Title>Work is waiting in a queue that no live agent serves</Alert.Title>
              <Alert.Description>{unserved.map((q) => q.warning).join(" · ")}</Alert.Description>
            </Alert.Content>
          </Alert.Root>
        ) : null}
        <Tabs.Root value={tab} onValueChange={(e) => setTab(e.value)} variant="line" lazyMount>
          <Tabs.List>
            <Tabs.Trigger value="agents">Agents ({data.agents.length})</Tabs.Trigger>
            <Tabs.Trigger value="queues">Queues ({data.queues.length})</Tabs.Trigger>
            {data.permissions.can_read_tokens ? <Tabs.Trigger value="tokens">Tokens</Tabs.Trigger> : null}
          </Tabs.List>
          <Tabs.Content value="agents">
            <AgentsTab overview={data} reload={overview.reload} />
          </Tabs.Content>
          <Tabs.Content value="queues">
            <QueuesTab overview={data} />
          </Tabs.Content>
          {data.permissions.can_read_tokens ? (
            <Tabs.Content value="tokens">
              <TokensTab canEdit={data.permissions.can_edit} />
            </Tabs.Content>
          ) : null}
        </Tabs.Root>
      </Stack>
    </Box>
  );
}
