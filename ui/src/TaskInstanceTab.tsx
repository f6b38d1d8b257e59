import { Alert, Badge, Box, Card, Heading, HStack, Spinner, Stack, Text, Timeline } from "@chakra-ui/react";

import { usePoll } from "./api";
import { StatusBadge } from "./badges";
import { delta, exactTime } from "./format";
import type { TaskRemote, TaskTry } from "./types";

export interface TaskInstanceProps {
  dagId: string;
  runId: string;
  taskId: string;
  mapIndex?: string;
}

/** The "Remote execution" tab of a task instance: the agent of each try and its timeline. */
export function TaskInstanceTab({ dagId, runId, taskId, mapIndex }: TaskInstanceProps) {
  const params = new URLSearchParams({ dag_id: dagId, run_id: runId, task_id: taskId, map_index: mapIndex ?? "-1" });
  const poll = usePoll<TaskRemote>(`/task-instance?${params.toString()}`, 5000);

  if (poll.error && !poll.data) {
    return (
      <Alert.Root status="error" m={4}>
        <Alert.Indicator />
        <Alert.Title>{poll.error.message}</Alert.Title>
      </Alert.Root>
    );
  }
  if (!poll.data) return <Spinner m={4} />;
  const tries = [...poll.data.tries].sort((a, b) => b.try_number - a.try_number);
  return (
    <Stack gap={4} p={4} data-testid="remote-execution-tab">
      {tries.length === 0 ? (
        <Text color="fg.muted" data-testid="no-remote-tries">
          No try of this task was handed to a Remote Execution agent (yet): it has not been queued, or it ran on another
          executor.
        </Text>
      ) : null}
      {tries.map((t) => (
        <TryCard key={`${t.try_number}-${t.work_id}`} t={t} />
      ))}
    </Stack>
  );
}

function TryCard({ t }: { t: TaskTry }) {
  const first = t.steps.find((s) => s.at)?.at ?? null;
  return (
    <Card.Root size="sm" variant="outline" data-testid={`try-${t.try_number}`}>
      <Card.Header>
        <HStack justify="space-between" wrap="wrap">
          <Heading size="sm">Try {t.try_number}</Heading>
          <HStack gap={2}>
            <Text fontSize="sm">agent</Text>
            <Badge colorPalette="blue" variant="subtle" data-testid="try-agent">
              {t.agent_name ?? "not leased yet"}
            </Badge>
            {t.agent_hostname ? (
              <Text fontSize="xs" color="fg.muted">
                on {t.agent_hostname}
              </Text>
            ) : null}
            <Text fontSize="sm">queue</Text>
            <Badge variant="outline">{t.queue}</Badge>
            <StatusBadge status={t.state} testId="try-state" />
          </HStack>
        </HStack>
      </Card.Header>
      <Card.Body>
        <Timeline.Root size="sm" data-testid="try-timeline">
          {t.steps.map((s) => (
            <Timeline.Item key={s.step} data-testid={`step-${s.step}`} opacity={s.at ? 1 : 0.5}>
              <Timeline.Connector>
                <Timeline.Separator />
                <Timeline.Indicator bg={s.at ? "blue.solid" : "bg.emphasized"} />
              </Timeline.Connector>
              <Timeline.Content>
                <Timeline.Title>
                  {s.label}
                  <Text as="span" fontWeight="normal" color="fg.muted" ms={2} fontFamily="mono" fontSize="xs">
                    {s.at ? exactTime(s.at) : "—"}
                    {s.at && first && s.at !== first ? `  (${delta(first, s.at)})` : ""}
                  </Text>
                </Timeline.Title>
                {s.note ? <Timeline.Description>{s.note}</Timeline.Description> : null}
              </Timeline.Content>
            </Timeline.Item>
          ))}
        </Timeline.Root>
        {t.info ? (
          <Box mt={2} fontSize="sm" color="fg.muted">
            {t.info}
          </Box>
        ) : null}
      </Card.Body>
    </Card.Root>
  );
}
