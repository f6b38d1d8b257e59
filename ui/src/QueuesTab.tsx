import { Alert, Badge, Box, Table, Text, Wrap } from "@chakra-ui/react";

import { duration } from "./format";
import type { Overview } from "./types";

export function QueuesTab({ overview }: { overview: Overview }) {
  return (
    <Box overflowX="auto">
      <Table.Root size="sm" variant="outline" data-testid="queues-table">
        <Table.Header>
          <Table.Row>
            <Table.ColumnHeader>Queue</Table.ColumnHeader>
            <Table.ColumnHeader textAlign="end">Queued</Table.ColumnHeader>
            <Table.ColumnHeader textAlign="end">Leased</Table.ColumnHeader>
            <Table.ColumnHeader textAlign="end">Running</Table.ColumnHeader>
            <Table.ColumnHeader>Oldest queued</Table.ColumnHeader>
            <Table.ColumnHeader>Agents serving it</Table.ColumnHeader>
          </Table.Row>
        </Table.Header>
        <Table.Body>
          {overview.queues.length === 0 ? (
            <Table.Row>
              <Table.Cell colSpan={6}>
                <Text color="fg.muted">No queue has work and no agent serves a queue yet.</Text>
              </Table.Cell>
            </Table.Row>
          ) : null}
          {overview.queues.map((q) => (
            <Table.Row key={q.queue} data-testid={`queue-row-${q.queue}`} verticalAlign="top">
              <Table.Cell>
                <Text fontWeight="semibold">{q.queue}</Text>
                {q.warning ? (
                  <Alert.Root status="warning" size="sm" mt={1} data-testid="queue-warning">
                    <Alert.Indicator />
                    <Alert.Title>{q.warning}</Alert.Title>
                  </Alert.Root>
                ) : null}
              </Table.Cell>
              <Table.Cell textAlign="end" data-testid="queue-queued">
                {q.queued}
              </Table.Cell>
              <Table.Cell textAlign="end">{q.leased}</Table.Cell>
              <Table.Cell textAlign="end">{q.running}</Table.Cell>
              <Table.Cell>{q.queued ? duration(q.oldest_queued_age) : "-"}</Table.Cell>
              <Table.Cell>
                <Wrap gap={1}>
                  {q.agents.length === 0 ? <Text color="fg.muted">none</Text> : null}
                  {q.agents.map((name) => {
                    const live = q.live_agents.includes(name);
                    return (
                      <Badge
                        key={name}
                        colorPalette={live ? "green" : "gray"}
                        variant={live ? "subtle" : "outline"}
                        title={live ? "leasing from this queue" : "not leasing (drained, stopping, offline or lost)"}
                      >
                        {name}
                      </Badge>
                    );
                  })}
                </Wrap>
              </Table.Cell>
            </Table.Row>
          ))}
        </Table.Body>
      </Table.Root>
    </Box>
  );
}
