// The page API's answers (airflow_remote_execution/plane/api/ui_routes.py).

export type Health = "healthy" | "degraded" | "draining" | "lost" | "offline";

export const HEALTHS: Health[] = ["healthy", "degraded", "draining", "lost", "offline"];

export interface SentinelCheck {
  name: string;
  ok: boolean;
  skipped: boolean;
  warning: boolean;
  detail: string;
  hint: string;
}

export interface SentinelView {
  status: string;
  at: string;
  age: number;
  stale: boolean;
  checks: SentinelCheck[];
}

export interface WorkRef {
  id: number;
  kind: string;
  state: string;
  queue: string;
  label: string;
  dag_id: string | null;
  task_id: string | null;
  run_id: string | null;
  map_index: number | null;
  try_number: number | null;
}

export interface AgentView {
  name: string;
  hostname: string | null;
  health: Health;
  health_reasons: string[];
  state: string;
  drained: boolean;
  drain_reason: string | null;
  drained_by: string | null;
  drained_at: string | null;
  queues: string[];
  concurrency: number;
  slots_used: number;
  running: WorkRef[];
  last_heartbeat_at: string | null;
  heartbeat_age: number | null;
  versions: Record<string, string>;
  version_mismatch: string[];
  sentinel: SentinelView | null;
  token_id: string | null;
  token_status: string | null;
}

export interface QueueView {
  queue: string;
  queued: number;
  leased: number;
  running: number;
  oldest_queued_age: number | null;
  agents: string[];
  live_agents: string[];
  warning: string | null;
}

export interface Permissions {
  user: string;
  can_edit: boolean;
  can_read_tokens: boolean;
}

export interface Overview {
  generated_at: string;
  heartbeat_interval: number;
  plane_versions: Record<string, string>;
  agents: AgentView[];
  queues: QueueView[];
  permissions: Permissions;
}

export interface TokenView {
  id: string;
  agent_name: string;
  queues: string[];
  bundles: string[];
  description: string | null;
  created_at: string;
  expires_at: string | null;
  revoked_at: string | null;
  last_used_at: string | null;
  status: string;
}

export interface TokenCreated {
  token: string;
  info: TokenView;
}

export interface TimelineStep {
  step: string;
  label: string;
  at: string | null;
  note: string | null;
}

export interface TaskTry {
  try_number: number;
  work_id: number;
  state: string;
  queue: string;
  agent_name: string | null;
  agent_hostname: string | null;
  info: string | null;
  steps: TimelineStep[];
}

export interface TaskRemote {
  dag_id: string;
  run_id: string;
  task_id: string;
  map_index: number;
  tries: TaskTry[];
}
