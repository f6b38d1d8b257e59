"""Agent registry: registration rules (identity from the token) and heartbeats."""

from __future__ import annotations

import pytest

from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.sdk import timezone

from airflow_remote_execution.plane import agents, leases, tokens
from airflow_remote_execution.plane.agents import AgentForbidden, AgentNotRegistered
from airflow_remote_execution.models import AgentModel, AgentTokenModel
from airflow_remote_execution.wire.api import AgentState, HeartbeatRequest, RegisterRequest


def new_token(db, name: str = "agent-1", queues=("default", "gpu")) -> AgentTokenModel:
    with db.session() as s:
        return tokens.create(s, agent_name=name, queues=list(queues))[1]


def register(db, token: AgentTokenModel, **fields) -> AgentModel:
    with db.session() as s:
        return agents.register(s, s.get(AgentTokenModel, token.id), RegisterRequest(**{"concurrency": 2, **fields}))


def name_key(name: str) -> TaskInstanceKey:
    return TaskInstanceKey(dag_id="d", task_id=name, run_id="r", try_number=1, map_index=-1)


def heartbeat(db, agent: AgentModel, **fields):
    with db.session() as s:
        row = s.get(AgentModel, agent.id)
        reply = agents.heartbeat(s, row, HeartbeatRequest(**{"free_slots": 1, **fields}))
    with db.session() as s:
        return reply, s.get(AgentModel, agent.id)


def test_register_defaults_to_all_token_queues(db):
    token = new_token(db)
    before = timezone.utcnow()
    agent = register(db, token, hostname="h1", versions={"airflow": "3.3.2"}, concurrency=3)
    assert agent.id is not None and agent.name == "agent-1" and agent.state == "active"
    assert agent.queues == ["default", "gpu"] and agent.concurrency == 3 and agent.free_slots == 3
    assert agent.hostname == "h1" and agent.versions == {"airflow": "3.3.2"} and agent.token_id == token.id
    assert agent.registered_at >= before and agent.last_heartbeat_at >= before


def test_register_with_a_subset_of_queues_and_name(db):
    token = new_token(db)
    agent = register(db, token, name="agent-1", queues=["gpu", "gpu"])
    assert agent.queues == ["gpu"]


def test_register_outside_the_token_queues_is_forbidden(db):
    token = new_token(db)
    with pytest.raises(AgentForbidden) as exc:
        register(db, token, queues=["gpu", "analytics", "bi"])
    msg = str(exc.value)
    assert msg.startswith(f"Queue(s) analytics, bi are outside token {token.id}'s queues (default, gpu)")
    assert "create a token with those queues" in msg
    with db.session() as s:
        assert s.query(AgentModel).count() == 0


def test_register_under_another_name_is_forbidden(db):
    token = new_token(db, name="agent-1")
    with pytest.raises(AgentForbidden, match=rf"Token {token.id} belongs to agent 'agent-1', not 'agent-2'"):
        register(db, token, name="agent-2")


def test_reregistration_updates_the_same_row(db):
    first_token = new_token(db)
    agent = register(db, first_token, concurrency=2)
    heartbeat(db, agent, offline=True)
    second_token = new_token(db)  # e.g. a rotated token for the same agent
    again = register(db, second_token, concurrency=8, queues=["default"], hostname="h2")
    assert again.id == agent.id
    assert again.state == "active" and again.concurrency == 8 and again.free_slots == 8
    assert again.queues == ["default"] and again.hostname == "h2" and again.token_id == second_token.id
    with db.session() as s:
        assert s.query(AgentModel).count() == 1


def test_for_token(db):
    token = new_token(db)
    with db.session() as s, pytest.raises(AgentNotRegistered, match="Agent 'agent-1' is not registered: POST /agents/register first"):
        agents.for_token(s.get(AgentTokenModel, token.id))
    agent = register(db, token)
    with db.session() as s:
        assert agents.for_token(s.get(AgentTokenModel, token.id)).id == agent.id


def test_token_and_its_agent_load_in_one_query(db):
    """Every agent request resolves both: one round trip, not two."""
    from sqlalchemy import event

    agent = register(db, token := new_token(db))
    register(db, new_token(db, name="agent-2"))
    statements = []
    with db.session() as s:
        engine = s.get_bind()
        listener = lambda _c, _cur, statement, *_: statements.append(statement)  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        try:
            row = s.get(AgentTokenModel, token.id)
            assert agents.for_token(row).id == agent.id and agents.for_token(row).name == "agent-1"
        finally:
            event.remove(engine, "before_cursor_execute", listener)
    assert len([st for st in statements if st.lstrip().upper().startswith("SELECT")]) == 1, statements


def test_heartbeat_records_liveness_and_returns_kill_list(db):
    agent = register(db, new_token(db))
    other = register(db, new_token(db, name="agent-2"))
    with db.session() as s:
        for name in ("mine", "theirs", "revoked"):
            leases.enqueue(s, key=name_key(name), kind="task", queue="default", priority_weight=1, workload="{}")
    with db.session() as s:
        (mine,) = leases.lease(s, s.get(AgentModel, agent.id), ["default"], 1, 30)
        (theirs,) = leases.lease(s, s.get(AgentModel, other.id), ["default"], 1, 30)
        (revoked,) = leases.lease(s, s.get(AgentModel, agent.id), ["default"], 1, 30)
        leases.revoke(s, name_key("revoked"))

    before = timezone.utcnow()
    reply, row = heartbeat(db, agent, running=[mine.id, theirs.id, revoked.id, 987654], free_slots=0)
    assert reply.kill == [theirs.id, revoked.id, 987654]
    assert reply.drain is False and reply.heartbeat_interval == 5.0
    assert row.free_slots == 0 and row.last_heartbeat_at >= before and row.state == "active"


def test_heartbeat_stopping_and_offline(db):
    """An agent shutting down says so (STOPPING: no new work); its last heartbeat says OFFLINE."""
    agent = register(db, new_token(db))
    reply, row = heartbeat(db, agent, draining=True)
    assert reply.drain is False and row.state == AgentState.STOPPING.value
    assert not agents.accepts_work(row)
    reply, row = heartbeat(db, agent, draining=True, offline=True)
    assert row.state == AgentState.OFFLINE.value


def test_operator_drain_survives_restarts_until_resumed(db):
    token = new_token(db)
    agent = register(db, token)
    with db.session() as s:
        assert agents.set_drained(s, "agent-1", True).drained is True
    reply, row = heartbeat(db, agent)
    assert reply.drain is True and row.state == "active" and not agents.accepts_work(row)
    agent = register(db, token)  # the agent restarts: still drained
    reply, row = heartbeat(db, agent)
    assert reply.drain is True and agent.drained is True
    with db.session() as s:
        agents.set_drained(s, "agent-1", False)
    reply, row = heartbeat(db, agent)
    assert reply.drain is False and agents.accepts_work(row)
    with db.session() as s, pytest.raises(LookupError, match="No agent named 'nobody'"):
        agents.set_drained(s, "nobody", True)


def test_remove_only_forgets_agents_that_are_gone(db):
    agent = register(db, new_token(db))
    with db.session() as s, pytest.raises(AgentForbidden, match="is active with 0 workload"):
        agents.remove(s, "agent-1")
    heartbeat(db, agent, draining=True, offline=True)
    with db.session() as s:
        agents.remove(s, "agent-1")
    with db.session() as s:
        assert agents.list_agents(s) == []
    agent = register(db, new_token(db, "agent-2"))
    with db.session() as s:
        agents.remove(s, "agent-2", force=True)
        assert agents.list_agents(s) == []


def test_heartbeat_revives_a_lost_agent(db):
    agent = register(db, new_token(db))
    with db.session() as s:
        s.get(AgentModel, agent.id).state = AgentState.LOST.value
    reply, row = heartbeat(db, agent)
    assert row.state == "active" and reply.drain is False


def test_plane_sets_the_heartbeat_interval(db, monkeypatch):
    agent = register(db, new_token(db))
    monkeypatch.setenv("AIRFLOW__REMOTE_EXECUTION__HEARTBEAT_INTERVAL", "17")
    reply, _ = heartbeat(db, agent)
    assert reply.heartbeat_interval == 17.0


def test_list_agents(db):
    a = register(db, new_token(db, name="b-agent"), hostname="hb", versions={"python": "3.11"})
    register(db, new_token(db, name="a-agent", queues=["default"]))
    with db.session() as s:
        leases.enqueue(s, key=name_key("x"), kind="task", queue="default", priority_weight=1, workload="{}")
    with db.session() as s:
        leases.lease(s, s.get(AgentModel, a.id), ["default"], 1, 30)
    with db.session() as s:
        listed = agents.list_agents(s)
    assert [i.name for i in listed] == ["a-agent", "b-agent"]
    assert [i.running for i in listed] == [0, 1]
    assert listed[1].hostname == "hb" and listed[1].versions == {"python": "3.11"} and listed[1].queues == ["default", "gpu"]



def _age_heartbeat(db, agent: AgentModel, seconds: float) -> None:
    from datetime import timedelta

    with db.session() as s:
        s.get(AgentModel, agent.id).last_heartbeat_at = timezone.utcnow() - timedelta(seconds=seconds)


def test_silent_agent_is_lost_and_its_work_reclaimed(db):
    silent = register(db, new_token(db, "silent", ["default"]))
    alive = register(db, new_token(db, "alive", ["default"]))
    with db.session() as s:
        for name in ("unstarted", "started"):
            leases.enqueue(s, key=name_key(name), kind="task", queue="default", priority_weight=1, workload="{}")
    with db.session() as s:
        leased = {i.key[2]: (i.id, i.fence) for i in leases.lease(s, s.get(AgentModel, silent.id), ["default"], 2, 30)}
    with db.session() as s:
        leases.confirm_start(s, s.get(AgentModel, silent.id), *leased["started"])
    _age_heartbeat(db, silent, 16)  # default: 3 intervals of 5 s

    with db.session() as s:
        lost = _detector().mark_lost(s)
        assert [a.name for a in lost] == ["silent"]
        assert leases.reclaim_from_lost(s, lost[0]) == (1, 1)
    with db.session() as s:
        assert s.get(AgentModel, silent.id).state == "lost" and s.get(AgentModel, alive.id).state == "active"
        unstarted = s.get(leases.WorkItemModel, leased["unstarted"][0])
        started = s.get(leases.WorkItemModel, leased["started"][0])
        assert (unstarted.state, unstarted.agent_id) == ("queued", None)
        assert (started.state, started.info) == ("failed", "agent silent lost (no heartbeat)")
        # The requeued item is leased by the live agent next; the lost agent's reports are fenced out.
        (again,) = leases.lease(s, s.get(AgentModel, alive.id), ["default"], 5, 30)
        assert again.id == unstarted.id and again.fence == leased["unstarted"][1] + 1
    with db.session() as s, pytest.raises(leases.LeaseConflict):
        leases.finish(s, s.get(AgentModel, silent.id), *leased["started"], leases.WorkState.SUCCESS, None)
    # When it comes back it is told to kill what was taken away.
    reply, row = heartbeat(db, silent, running=[leased["started"][0]])
    assert reply.kill == [leased["started"][0]] and row.state == "active"


def test_no_agent_is_lost_when_every_agent_is_silent(db):
    """All heartbeats stale at once means the plane (not every agent) was away: fail nothing; and once
    agents are heard again, the others get a full window to check in before any is lost."""
    a = register(db, new_token(db, "a", ["default"]))
    b = register(db, new_token(db, "b", ["default"]))
    _age_heartbeat(db, a, 60)
    _age_heartbeat(db, b, 60)
    detector = _detector()
    with db.session() as s:
        assert detector.mark_lost(s) == []
    _age_heartbeat(db, b, 0)  # the plane is back: b has checked in, a not yet
    with db.session() as s:
        assert detector.mark_lost(s) == []
    detector.grace_until -= detector.window()  # the window has passed and a is still silent
    with db.session() as s:
        assert [x.name for x in detector.mark_lost(s)] == ["a"]


def test_a_new_scheduler_gives_agents_one_window_to_check_in(db):
    a = register(db, new_token(db, "a", ["default"]))
    register(db, new_token(db, "b", ["default"]))
    _age_heartbeat(db, a, 60)
    detector = agents.LostAgentDetector()
    with db.session() as s:
        assert detector.mark_lost(s) == []
    detector.grace_until -= detector.window()
    with db.session() as s:
        assert [x.name for x in detector.mark_lost(s)] == ["a"]


def _detector() -> agents.LostAgentDetector:
    """A detector past its start-up grace window."""
    detector = agents.LostAgentDetector()
    detector.grace_until -= detector.window()
    return detector

def test_agents_heard_last_at_different_moments_before_a_plane_outage_are_not_lost(db):
    """The plane went away; agent a's last heartbeat came a little before b's. Seen from the plane, a is
    silent for more than a window while b is not yet: that is not a lost agent, both were cut off."""
    a = register(db, new_token(db, "a", ["default"]))
    b = register(db, new_token(db, "b", ["default"]))
    _age_heartbeat(db, a, 15.6)
    _age_heartbeat(db, b, 14.9)
    with db.session() as s:
        assert _detector().mark_lost(s) == []
    _age_heartbeat(db, b, 0)  # b is heard again and a stays silent: now a is lost
    with db.session() as s:
        assert [x.name for x in _detector().mark_lost(s)] == ["a"]


def test_a_restarted_agent_gets_none_of_its_predecessors_work(db):
    """A killed agent's replacement can register before the old one is found lost: whatever the agent
    held and does not say it still runs is taken back at once (leases requeued, running work failed)."""
    agent = register(db, new_token(db, "phoenix", ["default"]))
    with db.session() as s:
        for name in ("leased", "running", "kept"):
            leases.enqueue(s, key=name_key(name), kind="task", queue="default", priority_weight=1, workload="{}")
    with db.session() as s:
        held = {i.key[2]: (i.id, i.fence) for i in leases.lease(s, s.get(AgentModel, agent.id), ["default"], 3, 30)}
    with db.session() as s:
        for name in ("running", "kept"):
            leases.confirm_start(s, s.get(AgentModel, agent.id), *held[name])

    register(db, new_token(db, "phoenix", ["default"]), running=[held["kept"][0]])

    with db.session() as s:
        state = {n: s.get(leases.WorkItemModel, held[n][0]) for n in held}
        assert (state["leased"].state, state["leased"].agent_id) == ("queued", None)
        assert (state["running"].state, state["running"].info) == (
            "failed", "agent phoenix restarted (work of the previous process)"
        )
        assert state["kept"].state == "running"  # re-registering after a 409 keeps what it still runs


def test_a_stalled_plane_starts_a_grace_window(db):
    """No heartbeat for two intervals (an api-server stalled, then answering everyone at once): the agent
    whose heartbeat lands a moment after another's is not lost; it has a window to check in."""
    a = register(db, new_token(db, "a", ["default"]))
    b = register(db, new_token(db, "b", ["default"]))
    _age_heartbeat(db, a, 11)
    _age_heartbeat(db, b, 11)
    detector = _detector()
    with db.session() as s:
        assert detector.mark_lost(s) == []  # 11 s of silence everywhere (> 2 x 5 s): the plane stalled
    _age_heartbeat(db, a, 16)
    _age_heartbeat(db, b, 0)  # the stall ends: b's heartbeat got in first
    with db.session() as s:
        assert detector.mark_lost(s) == []
