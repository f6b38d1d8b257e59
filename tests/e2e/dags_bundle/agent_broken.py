"""An import error the plane must show: this DAG file cannot be imported."""

from airflow.sdk import DAG  # noqa: F401

import module_that_only_exists_nowhere  # noqa: F401
