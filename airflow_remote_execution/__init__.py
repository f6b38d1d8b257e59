"""Remote Execution for Apache Airflow 3.

* ``plane/``: the orchestration plane beside the metadata DB; ``plane/leases.py`` is the only code that
  changes a work item's state, ``plane/api/`` the Remote Execution API;
* ``agent/``: everything an agent runs; speaks only HTTP to the plane, never SQL;
* ``wire/``: the pydantic schemas both sides share; ``xcom/``: the data plane both use;
* Airflow glue: ``executors/``, ``plugins/``, ``models/``, ``migrations/``, ``cli/``, ``config.py``,
  ``log_handler.py``.
"""

__version__ = "0.1.0"
