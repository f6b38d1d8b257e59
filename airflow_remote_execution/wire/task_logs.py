"""Wire schemas of ``POST /remote_execution/v1/work/{work_id}/log`` and ``/v1/triggers/{trigger_id}/log``: a
piece of a task's (or its trigger's) log an agent sends to the plane when no remote logging is configured
(``[remote_execution] plane_task_logs``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

INT32_MAX = 2**31 - 1
# Bytes of the agent's log file one request covers (the agent splits larger news): even text JSON escapes
# sixfold (control characters) stays within the API's default max_body_size of 1 MiB.
MAX_PIECE = 128 * 1024


class LogPiece(BaseModel):
    """Bytes ``start`` to ``end`` of the work's log file on the agent, as text (UTF-8, whole lines except
    at the end of the task). Offsets make a retry idempotent: the plane keeps each byte once."""

    model_config = ConfigDict(extra="forbid")

    fence: int = Field(
        ge=1, le=INT32_MAX,
        description="A task's log: the fencing token the work was leased with. A trigger's log: the id of the "
        "agent triggerer that runs it.",
    )
    start: int = Field(ge=0, le=INT32_MAX, description="Offset of the piece's first byte in the log file.")
    end: int = Field(ge=1, le=INT32_MAX, description="Offset after the piece's last byte.")
    text: str = Field(max_length=MAX_PIECE, description="The bytes start..end, decoded as UTF-8.")

    @model_validator(mode="after")
    def _span(self) -> LogPiece:
        if not 0 < self.end - self.start <= MAX_PIECE:
            raise ValueError(f"end - start must be between 1 and {MAX_PIECE} bytes, got {self.end - self.start}")
        return self


class LogPieceResponse(BaseModel):
    stored_until: int = Field(description="Offset the plane holds the log up to: the next piece starts there.")
    truncated: bool = Field(
        default=False, description="The plane's size cap for one task try's log is reached: it keeps no more."
    )
