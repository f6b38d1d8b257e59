"""``airflow remote-execution secrets configure``: print or write an agent's ``[workers] secrets_backend``."""

from __future__ import annotations

import os
from pathlib import Path

from airflow_remote_execution.agent.secrets_config import SecretsConfigError, SecretsOptions, build, write

_OPTION_NAMES = tuple(f for f in SecretsOptions.__dataclass_fields__ if f != "backend")


def _options(args) -> SecretsOptions:
    given = {name: getattr(args, name) for name in _OPTION_NAMES if getattr(args, name, None) is not None}
    return SecretsOptions(backend=args.backend, **given)


def secrets_configure(args) -> None:
    try:
        config = build(_options(args))
        target = None
        if args.write:
            home = os.environ.get("AIRFLOW_HOME") or str(Path("~/airflow").expanduser())
            target = Path(args.config_file or os.environ.get("AIRFLOW_CONFIG") or Path(home) / "airflow.cfg")
            write(config, target)
    except SecretsConfigError as e:
        raise SystemExit(f"secrets configure: {e}") from None
    if target:
        print(f"Wrote [workers] secrets_backend ({config.backend}) to {target}")
    elif args.format == "env":
        print(config.as_env(), end="")
    else:
        print(config.as_ini(), end="")
    if config.env:
        print("\n# Set on the agent (values from your secret store; never put them in airflow.cfg):")
        print(config.env_lines(), end="")
    for note in config.notes:
        print(f"# {note}")
    print("# Lookup order in tasks: this backend, then AIRFLOW_CONN_*/AIRFLOW_VAR_* env vars, then the plane.")
