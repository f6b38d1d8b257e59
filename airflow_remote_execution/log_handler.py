"""The documented ``[logging] logging_config_class`` path, ``airflow_remote_execution.log_handler.LOGGING_CONFIG``.

The handler lives in :mod:`airflow_remote_execution.plane.task_logs`. Airflow reads ``REMOTE_TASK_LOG`` and
``DEFAULT_REMOTE_CONN_ID`` from the module that holds ``LOGGING_CONFIG``, so they are re-exported too.
"""

from airflow_remote_execution.plane.task_logs import *  # noqa: F403
from airflow_remote_execution.plane.task_logs import __all__  # noqa: F401
