// Entry of the UMD bundle: the Airflow UI loads it for both react_apps of the plugin and renders its
// default export with the route's parameters (a task instance's tab gets dagId, runId, taskId).
import { RemoteAgentsPage } from "./RemoteAgentsPage";
import { TaskInstanceTab } from "./TaskInstanceTab";

export interface PluginProps {
  dagId?: string;
  runId?: string;
  taskId?: string;
  mapIndex?: string;
}

export default function RemoteExecutionPlugin({ dagId, runId, taskId, mapIndex }: PluginProps) {
  if (dagId && runId && taskId) {
    return <TaskInstanceTab dagId={dagId} runId={runId} taskId={taskId} mapIndex={mapIndex} />;
  }
  return <RemoteAgentsPage />;
}
