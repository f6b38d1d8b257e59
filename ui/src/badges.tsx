import { Badge } from "@chakra-ui/react";

import type { Health } from "./types";

const HEALTH_PALETTE: Record<Health, string> = {
  healthy: "green",
  degraded: "orange",
  draining: "purple",
  lost: "red",
  offline: "gray",
};

export function HealthBadge({ health }: { health: Health }) {
  return (
    <Badge colorPalette={HEALTH_PALETTE[health] ?? "gray"} variant="solid" data-testid="agent-health">
      {health}
    </Badge>
  );
}

const STATUS_PALETTE: Record<string, string> = {
  ok: "green",
  degraded: "orange",
  failing: "red",
  active: "green",
  expired: "gray",
  revoked: "red",
  queued: "gray",
  leased: "cyan",
  running: "blue",
  success: "green",
  failed: "red",
};

export function StatusBadge({ status, testId }: { status: string; testId?: string }) {
  return (
    <Badge colorPalette={STATUS_PALETTE[status] ?? "gray"} variant="subtle" data-testid={testId}>
      {status}
    </Badge>
  );
}
