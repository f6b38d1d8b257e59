"""Remote Execution for Apache Airflow 3.

Layout (reads like the architecture):

* orchestration plane: ``executors/`` (RemoteExecutor), ``models/`` (tables + migrations),
  ``leases.py`` (the only code that changes a work item's state), ``tokens.py``, ``wakeup.py``,
  ``api/`` (the Remote Execution API), ``plugins/`` (mounts the API in ``airflow api-server``);
* agent: ``agent/`` (HTTP client and worker; speaks only HTTP, never SQL);
* shared: ``protocol.py`` (wire schemas), ``config.py``, ``cli/``.
"""

__version__ = "0.1.0"
