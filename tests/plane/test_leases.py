"""The work-item state machine (leases.py) on real databases: SQLite and PostgreSQL."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from airflow.models.callback import CallbackKey
from airflow.models.connection_test import ConnectionTestKey
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.sdk import timezone

from airflow_remote_execution.plane import agents, leases, tokens
from airflow_remote_execution.plane.leases import LeaseConflict
from airflow_remote_execution.models import AgentModel, WorkItemModel
from airflow_remote_execution.wire.api import RegisterRequest, WorkState


def ti_key(task: str = "t", try_number: int = 1, map_index: int = -1, dag: str = "dag", run: str = "run-1"):
    return TaskInstanceKey(dag_id=dag, task_id=task, run_id=run, try_number=try_number, map_index=map_index)


def make_agent(db, name: str, queues: list[str], concurrency: int = 4) -> AgentModel:
    with db.session() as s:
        _, token = tokens.create(s, agent_name=name, queues=queues)
        return agents.register(s, token, RegisterRequest(concurrency=concurrency))


def enqueue(db, key, queue: str = "default", priority: int = 1, kind: str = "task", workload: str | None = None):
    with db.session() as s:
        leases.enqueue(
            s, key=key, kind=kind, queue=queue, priority_weight=priority, workload=workload or json.dumps({"k": str(key)})
        )
    return item_for(db, key)


def item_for(db, key) -> WorkItemModel:
    digest = leases.key_digest(leases.key_to_json(key))
    with db.session() as s:
        return s.scalars(select(WorkItemModel).where(WorkItemModel.key_digest == digest).order_by(WorkItemModel.id.desc())).first()


def get(db, work_id: int) -> WorkItemModel:
    with db.session() as s:
        return s.get(WorkItemModel, work_id)


def lease(db, agent, queues=("default",), slots: int = 10, confirm_timeout: float = 30) -> list[WorkItemModel]:
    with db.session() as s:
        agent = s.get(AgentModel, agent.id)
        return leases.lease(s, agent, list(queues), slots, confirm_timeout)


def call(db, fn, agent, *args):
    with db.session() as s:
        return fn(s, s.get(AgentModel, agent.id), *args)


# ------------------------------------------------------------------ keys


def test_keys_round_trip_and_digests_differ():
    keys = [
        ti_key(),
        ti_key(try_number=2),
        ti_key(map_index=3),
        CallbackKey(id="0b7a6b1e-97b5-4a8e-8d0c-2f1d0f4c3a11"),
        ConnectionTestKey(id="6f1c1a7e-1d2b-4c3d-9e8f-0a1b2c3d4e5f"),
    ]
    as_json = [leases.key_to_json(k) for k in keys]
    assert as_json[0] == ["ti", "dag", "t", "run-1", -1, 1]
    assert as_json[3][0] == "callback" and as_json[4][0] == "connection_test"
    for key, data in zip(keys, as_json, strict=True):
        back = leases.key_from_json(json.loads(json.dumps(data)))
        assert back == key and type(back) is type(key) and hash(back) == hash(key)
    digests = [leases.key_digest(d) for d in as_json]
    assert len(set(digests)) == len(digests) and all(len(d) == 40 for d in digests)
    assert leases.key_digest(leases.key_to_json(ti_key())) == digests[0]


# ------------------------------------------------------------------ enqueue


def test_enqueue_new_item(db):
    before = timezone.utcnow()
    item = enqueue(db, ti_key(), queue="gpu", priority=7, workload='{"x": 1}')
    assert (item.kind, item.queue, item.priority_weight, item.workload) == ("task", "gpu", 7, '{"x": 1}')
    assert item.state == "queued" and item.fence == 0 and item.reported_state is None
    assert item.key == ["ti", "dag", "t", "run-1", -1, 1]
    assert item.agent_id is None and item.leased_at is None and item.queued_at >= before


@pytest.mark.parametrize("progress", ["queued", "leased", "running"])
def test_enqueue_same_key_again_replaces_the_lease_and_bumps_the_fence(db, progress):
    agent = make_agent(db, "a", ["default", "other"])
    first = enqueue(db, ti_key(), workload='{"v": 1}')
    fence = 0
    if progress in ("leased", "running"):
        (leased,) = lease(db, agent)
        fence = leased.fence
        assert fence == 1
    if progress == "running":
        call(db, leases.confirm_start, agent, first.id, fence)
        with db.session() as s:
            leases.mark_reported(s, get(db, first.id), "running")

    again = enqueue(db, ti_key(), queue="other", priority=9, workload='{"v": 2}')
    assert again.id == first.id
    with db.session() as s:
        assert s.scalar(select(WorkItemModel.id).where(WorkItemModel.id != first.id)) is None  # still one row
    assert again.state == "queued" and again.fence == fence + 1
    assert (again.queue, again.priority_weight, again.workload) == ("other", 9, '{"v": 2}')
    assert again.agent_id is None and again.agent_name is None
    assert again.leased_at is None and again.lease_expires_at is None and again.started_at is None
    assert again.reported_state is None
    if progress == "leased":  # the old lessee is fenced out
        with pytest.raises(LeaseConflict, match="not leased to agent 'a'"):
            call(db, leases.confirm_start, agent, first.id, fence)
    if progress == "running":
        with pytest.raises(LeaseConflict, match="not leased to agent 'a'"):
            call(db, leases.finish, agent, first.id, fence, WorkState.SUCCESS, None)
    (new_lease,) = lease(db, agent, queues=["other"])
    assert new_lease.id == first.id and new_lease.fence == fence + 2


def test_enqueue_after_finish_creates_a_new_item(db):
    agent = make_agent(db, "a", ["default"])
    first = enqueue(db, ti_key())
    (leased,) = lease(db, agent)
    call(db, leases.confirm_start, agent, leased.id, leased.fence)
    call(db, leases.finish, agent, leased.id, leased.fence, WorkState.FAILED, "boom")
    second = enqueue(db, ti_key())
    assert second.id != first.id and second.state == "queued" and second.fence == 0
    assert get(db, first.id).state == "failed"


# ------------------------------------------------------------------ lease


def test_lease_order_queues_and_slots(db):
    agent = make_agent(db, "a", ["default", "gpu", "other"])
    low = enqueue(db, ti_key("low"), priority=1)
    high = enqueue(db, ti_key("high"), priority=10)
    low2 = enqueue(db, ti_key("low2"), priority=1)
    gpu = enqueue(db, ti_key("gpu"), queue="gpu", priority=100)
    other = enqueue(db, ti_key("other"), queue="other", priority=1000)

    before = timezone.utcnow()
    got = lease(db, agent, queues=["default", "gpu"], slots=3, confirm_timeout=30)
    assert [i.id for i in got] == [gpu.id, high.id, low.id]  # priority, then FIFO; "other" not asked for
    for item in got:
        assert item.state == "leased" and item.fence == 1
        assert item.agent_id == agent.id and item.agent_name == "a"
        assert before <= item.leased_at <= timezone.utcnow()
        assert item.lease_expires_at - item.leased_at == timedelta(seconds=30)
    with db.session() as s:
        first = s.get(AgentModel, agent.id).last_lease_at
        assert first >= before

    assert [i.id for i in lease(db, agent, queues=["default", "gpu"], slots=3)] == [low2.id]
    with db.session() as s:  # written at most every LAST_LEASE_PRECISION (5 s): not one more write per lease
        assert s.get(AgentModel, agent.id).last_lease_at == first
    assert lease(db, agent, queues=["default", "gpu"], slots=3) == []
    assert get(db, other.id).state == "queued"
    assert lease(db, agent, queues=["other"], slots=0) == []
    assert lease(db, agent, queues=[], slots=5) == []
    assert get(db, other.id).state == "queued"
    assert [i.id for i in lease(db, agent, queues=["other"], slots=1)] == [other.id]


# ------------------------------------------------------------------ start / finish / release


def test_confirm_start_and_finish(db):
    agent = make_agent(db, "a", ["default"])
    item = enqueue(db, ti_key())
    (leased,) = lease(db, agent)
    running = call(db, leases.confirm_start, agent, item.id, leased.fence)
    assert running.state == "running" and running.started_at is not None and running.lease_expires_at is None
    done = call(db, leases.finish, agent, item.id, leased.fence, WorkState.SUCCESS, "ok")
    assert done.state == "success" and done.info == "ok" and done.finished_at >= done.started_at
    assert done.fence == 1 and done.agent_name == "a"


def test_fencing_errors_are_clear(db):
    owner = make_agent(db, "owner", ["default"])
    other = make_agent(db, "other", ["default"])
    item = enqueue(db, ti_key())
    (leased,) = lease(db, owner)
    fence = leased.fence

    with pytest.raises(LeaseConflict, match=rf"^Work item {item.id} is not leased to agent 'other'$"):
        call(db, leases.confirm_start, other, item.id, fence)
    with pytest.raises(LeaseConflict, match=rf"^Stale fencing token {fence + 1} for work item {item.id}: the current lease is {fence}$"):
        call(db, leases.confirm_start, owner, item.id, fence + 1)
    with pytest.raises(LeaseConflict, match=rf"^Work item {item.id} is leased, expected running$"):
        call(db, leases.finish, owner, item.id, fence, WorkState.SUCCESS, None)
    with pytest.raises(LookupError, match="No work item 999999"):
        call(db, leases.confirm_start, owner, 999999, fence)
    with pytest.raises(ValueError, match="outcome must be 'success' or 'failed'"):
        call(db, leases.finish, owner, item.id, fence, WorkState.REVOKED, None)
    assert get(db, item.id).state == "leased"  # nothing changed

    call(db, leases.confirm_start, owner, item.id, fence)
    # Confirming again under the same lease is a retry (test_a_report_whose_answer_was_lost...), not a conflict.
    assert call(db, leases.confirm_start, owner, item.id, fence).state == "running"
    with pytest.raises(LeaseConflict, match="is running, expected leased"):
        call(db, leases.release, owner, item.id, fence)
    with pytest.raises(LeaseConflict, match="not leased to agent 'other'"):
        call(db, leases.finish, other, item.id, fence, WorkState.SUCCESS, None)
    call(db, leases.finish, owner, item.id, fence, WorkState.FAILED, "exit code 1")
    with pytest.raises(LeaseConflict, match=rf"^Work item {item.id} is failed, expected running$"):
        call(db, leases.finish, owner, item.id, fence, WorkState.SUCCESS, None)
    assert get(db, item.id).state == "failed" and get(db, item.id).info == "exit code 1"


def test_release_requeues_for_everyone(db):
    owner = make_agent(db, "owner", ["default"])
    other = make_agent(db, "other", ["default"])
    item = enqueue(db, ti_key())
    (leased,) = lease(db, owner)
    released = call(db, leases.release, owner, item.id, leased.fence)
    assert released.state == "queued" and released.agent_id is None and released.lease_expires_at is None
    with pytest.raises(LeaseConflict, match="not leased to agent 'owner'"):
        call(db, leases.release, owner, item.id, leased.fence)
    with pytest.raises(LeaseConflict, match="not leased to agent 'owner'"):
        call(db, leases.confirm_start, owner, item.id, leased.fence)
    (again,) = lease(db, other)
    assert again.id == item.id and again.fence == leased.fence + 1 and again.agent_name == "other"
    with pytest.raises(LeaseConflict):
        call(db, leases.confirm_start, owner, item.id, leased.fence)
    assert call(db, leases.confirm_start, other, item.id, again.fence).state == "running"


def test_same_agent_with_an_old_fence_is_stale(db):
    agent = make_agent(db, "a", ["default"])
    item = enqueue(db, ti_key())
    (first,) = lease(db, agent)
    call(db, leases.release, agent, item.id, first.fence)
    (second,) = lease(db, agent)
    assert second.fence == first.fence + 1
    with pytest.raises(LeaseConflict, match=f"Stale fencing token {first.fence} .* current lease is {second.fence}"):
        call(db, leases.confirm_start, agent, item.id, first.fence)


# ------------------------------------------------------------------ executor-side maintenance


def test_requeue_expired_leases(db):
    agent = make_agent(db, "a", ["default", "gpu"])
    expired = enqueue(db, ti_key("expired"), priority=3)
    expired_gpu = enqueue(db, ti_key("expired-gpu"), queue="gpu", priority=3)
    fresh = enqueue(db, ti_key("fresh"), priority=2)
    started = enqueue(db, ti_key("started"), priority=1)
    waiting = enqueue(db, ti_key("waiting"), priority=0)
    old = lease(db, agent, queues=["default", "gpu"], slots=2, confirm_timeout=-1)
    assert {i.id for i in old} == {expired.id, expired_gpu.id}
    lease(db, agent, slots=2, confirm_timeout=60)
    call(db, leases.confirm_start, agent, started.id, 1)

    with db.session() as s:
        assert leases.requeue_expired_leases(s) == 2
    states = {i: get(db, i).state for i in (expired.id, expired_gpu.id, fresh.id, started.id, waiting.id)}
    assert states == {expired.id: "queued", expired_gpu.id: "queued", fresh.id: "leased", started.id: "running", waiting.id: "queued"}
    row = get(db, expired.id)
    assert row.agent_id is None and row.leased_at is None and row.lease_expires_at is None and row.fence == 1
    with db.session() as s:
        assert leases.requeue_expired_leases(s) == 0
    # Too late to start: the lease was taken back.
    with pytest.raises(LeaseConflict, match="not leased to agent 'a'"):
        call(db, leases.confirm_start, agent, expired.id, 1)
    relet = lease(db, agent, queues=["default", "gpu"], slots=2)
    assert {(i.id, i.fence) for i in relet} == {(expired.id, 2), (expired_gpu.id, 2)}


def test_revoke(db):
    agent = make_agent(db, "a", ["default"])
    running = enqueue(db, ti_key("r"))
    (leased,) = lease(db, agent)
    call(db, leases.confirm_start, agent, running.id, leased.fence)
    done = enqueue(db, ti_key("d"))
    (d,) = lease(db, agent)
    call(db, leases.confirm_start, agent, done.id, d.fence)
    call(db, leases.finish, agent, done.id, d.fence, WorkState.SUCCESS, None)
    queued = enqueue(db, ti_key("q"))

    with db.session() as s:
        assert leases.revoke(s, ti_key("r")) == 1
        assert leases.revoke(s, ti_key("q")) == 1
        assert leases.revoke(s, ti_key("d")) == 0  # finished: nothing to take back
        assert leases.revoke(s, ti_key("unknown")) == 0
    for work_id in (running.id, queued.id):
        row = get(db, work_id)
        assert row.state == "revoked" and row.reported_state == "revoked" and row.finished_at is not None
    assert get(db, done.id).state == "success"
    with pytest.raises(LeaseConflict, match=rf"Work item {running.id} is revoked, expected running"):
        call(db, leases.finish, agent, running.id, leased.fence, WorkState.SUCCESS, None)
    assert lease(db, agent) == []  # revoked work is not handed out
    with db.session() as s:
        # Revoked items are never reported back to the scheduler (it asked for the revocation).
        assert [i.id for i in leases.pending_reports(s)] == [done.id]


def test_pending_reports_and_mark_reported(db):
    agent = make_agent(db, "a", ["default"])
    item = enqueue(db, ti_key())
    other = enqueue(db, ti_key("other"))

    def pending():
        with db.session() as s:
            return {(i.id, i.state) for i in leases.pending_reports(s)}

    assert pending() == set()  # queued work has nothing to report
    (leased,) = lease(db, agent, slots=1)
    assert leased.id == item.id and pending() == set()
    call(db, leases.confirm_start, agent, item.id, 1)
    assert pending() == {(item.id, "running")}
    with db.session() as s:
        leases.mark_reported(s, get(db, item.id), "running")
    assert pending() == set()
    call(db, leases.finish, agent, item.id, 1, WorkState.SUCCESS, None)
    assert pending() == {(item.id, "success")}
    # Marking a state the item has already left does nothing (it changed since it was read).
    with db.session() as s:
        leases.mark_reported(s, get(db, item.id), "running")
    assert pending() == {(item.id, "success")}
    with db.session() as s:
        leases.mark_reported(s, get(db, item.id), "success")
    assert pending() == set() and get(db, item.id).reported_state == "success"
    assert get(db, other.id).reported_state is None


def test_adoptable_digests(db):
    """Live work, and finished work whose outcome was never reported; not reported or revoked work."""
    agent = make_agent(db, "a", ["default"])
    names = ("queued", "leased", "running", "done", "failed-reported", "revoked", "absent")
    keys = {name: ti_key(name) for name in names}
    digest = {name: leases.key_digest(leases.key_to_json(k)) for name, k in keys.items()}
    for name in ("leased", "running", "done", "failed-reported"):
        enqueue(db, keys[name], priority=1)
    lease(db, agent, slots=4)
    for name in ("running", "done", "failed-reported"):
        call(db, leases.confirm_start, agent, item_for(db, keys[name]).id, 1)
    call(db, leases.finish, agent, item_for(db, keys["done"]).id, 1, WorkState.SUCCESS, None)
    call(db, leases.finish, agent, item_for(db, keys["failed-reported"]).id, 1, WorkState.FAILED, None)
    with db.session() as s:
        leases.mark_reported(s, get(db, item_for(db, keys["failed-reported"]).id), "failed")
    enqueue(db, keys["queued"])
    enqueue(db, keys["revoked"])
    with db.session() as s:
        leases.revoke(s, keys["revoked"])
        assert leases.adoptable_digests(s, digest.values()) == {digest[n] for n in ("queued", "leased", "running", "done")}
        assert leases.adoptable_digests(s, []) == set()
        assert leases.adoptable_digests(s, iter([digest["absent"]])) == set()


def test_purge_finished(db):
    agent = make_agent(db, "a", ["default"])
    names = ("old-reported", "old-unreported", "new-reported", "old-revoked", "running", "queued")
    for name in names:
        enqueue(db, ti_key(name))
    lease(db, agent, slots=5)
    ids = {name: item_for(db, ti_key(name)).id for name in names}
    for name in ("old-reported", "old-unreported", "new-reported", "running"):
        call(db, leases.confirm_start, agent, ids[name], 1)
    for name in ("old-reported", "old-unreported", "new-reported"):
        call(db, leases.finish, agent, ids[name], 1, WorkState.SUCCESS, None)
    with db.session() as s:
        leases.revoke(s, ti_key("old-revoked"))
        for name in ("old-reported", "new-reported"):
            leases.mark_reported(s, s.get(WorkItemModel, ids[name]), "success")
        old = timezone.utcnow() - timedelta(hours=2)
        s.execute(
            update(WorkItemModel)
            .where(WorkItemModel.id.in_([ids["old-reported"], ids["old-unreported"], ids["old-revoked"]]))
            .values(finished_at=old)
        )
    with db.session() as s:
        assert leases.purge_finished(s, timedelta(hours=1)) == 3
    with db.session() as s:
        left = {s.get(WorkItemModel, i).key[2] for i in ids.values() if s.get(WorkItemModel, i) is not None}
    # Finished before the cutoff: gone, reported or not (no scheduler may ever adopt an unreported
    # one). Recent or unfinished: kept.
    assert left == {"new-reported", "running", "queued"}


def test_not_owned_and_running_counts(db):
    a = make_agent(db, "a", ["default"])
    b = make_agent(db, "b", ["default"])
    items = [enqueue(db, ti_key(f"t{i}")) for i in range(4)]
    leased_a = lease(db, a, slots=2)
    leased_b = lease(db, b, slots=1)
    call(db, leases.confirm_start, a, leased_a[0].id, 1)
    running_a, leased_only_a = leased_a[0].id, leased_a[1].id
    assert call(db, leases.not_owned, a, [running_a, leased_only_a, leased_b[0].id, items[3].id, 424242]) == [
        leased_b[0].id, items[3].id, 424242,
    ]
    assert call(db, leases.not_owned, a, []) == []
    with db.session() as s:
        assert leases.running_counts(s) == {a.id: 2, b.id: 1}
        leases.revoke(s, leases.key_from_json(get(db, running_a).key))
    assert call(db, leases.not_owned, a, [running_a, leased_only_a]) == [running_a]
    with db.session() as s:
        assert leases.running_counts(s) == {a.id: 1, b.id: 1}


# ------------------------------------------------------------------ concurrency


def test_concurrent_lessees_never_share_an_item(db):
    """Many agents lease from one queue at once (own sessions, own connections): each item goes to exactly one."""
    n_items, n_threads = 120, 8
    lessees = [make_agent(db, f"agent-{i}", ["default"]) for i in range(n_threads)]
    with db.session() as s:
        for i in range(n_items):
            leases.enqueue(s, key=ti_key(f"t{i}"), kind="task", queue="default", priority_weight=i % 5, workload="{}")
    got: dict[int, list[tuple[int, int]]] = {a.id: [] for a in lessees}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def worker(agent: AgentModel) -> None:
        rnd = random.Random(agent.id)
        try:
            barrier.wait()
            empty = 0
            while empty < 3:
                with db.session() as s:
                    mine = leases.lease(s, s.get(AgentModel, agent.id), ["default"], rnd.randint(1, 4), 30)
                    got[agent.id].extend((i.id, i.fence) for i in mine)
                empty = 0 if mine else empty + 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(a,)) for a in lessees]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    all_leases = [work_id for pairs in got.values() for work_id, _ in pairs]
    duplicates = [w for w, n in Counter(all_leases).items() if n > 1]
    assert not duplicates, f"leased more than once: {duplicates}"
    assert len(all_leases) == n_items
    assert sum(1 for pairs in got.values() if pairs) > 1, "expected the work to be spread over several agents"
    with db.session() as s:
        rows = list(s.scalars(select(WorkItemModel)))
    assert {r.state for r in rows} == {"leased"} and {r.fence for r in rows} == {1}
    owner = {work_id: agent_id for agent_id, pairs in got.items() for work_id, _ in pairs}
    assert all(owner[r.id] == r.agent_id for r in rows)


# ------------------------------------------------------------------ bundles parsed by agents


def test_work_of_an_agent_parsed_bundle_goes_only_to_tokens_allowing_it(db):
    """A bundle some agent token may parse is that token's work: another team's agent on the same queue
    never leases its tasks or callbacks (issue 13: a parse-only token's callback ran on another team's agent)."""
    from airflow_remote_execution.plane import parsing

    with db.session() as s:
        _, evil_parser = tokens.create(s, agent_name="evil-parser", queues=["team-a"], bundles=["evil"])
    parsing._parsed_by_agents = (float("-inf"), frozenset())  # no cached view from an earlier test
    other_team = make_agent(db, "other-team", ["default"])
    with db.session() as s:
        for i, bundle in enumerate(["evil", None, "plane-bundle"]):
            leases.enqueue(s, key=ti_key(f"t{i}"), kind="task", queue="default", priority_weight=10 - i,
                           workload="{}", bundle=bundle)
        leases.enqueue(s, key=CallbackKey(id="cb"), kind="callback", queue="default", priority_weight=99,
                       workload="{}", bundle="evil")
    with db.session() as s:
        token = s.scalars(select(tokens.AgentTokenModel).where(tokens.AgentTokenModel.agent_name == "other-team")).one()
        refused = parsing.bundles_refused_to(s, token)
        assert refused == ["evil"]
        agent = s.get(AgentModel, other_team.id)
        taken = leases.lease(s, agent, ["default"], 10, 30, not_bundles=refused)
        assert sorted(i.bundle or "" for i in taken) == ["", "plane-bundle"]
    evil_agent = None
    with db.session() as s:
        evil_agent = agents.register(s, s.get(tokens.AgentTokenModel, evil_parser.id), RegisterRequest(concurrency=4))
        taken = leases.lease(s, evil_agent, ["default"], 10, 30, not_bundles=parsing.bundles_refused_to(s, evil_parser))
        assert sorted((i.kind, i.bundle) for i in taken) == [("callback", "evil"), ("task", "evil")]


def test_a_report_whose_answer_was_lost_can_be_sent_again(db):
    """The same confirmation or finish under the same lease is answered as the first (issue 14: a lost
    start reply made the agent kill a task the plane believed started); another outcome still conflicts."""
    agent = make_agent(db, "retrier", ["default"])
    item = enqueue(db, ti_key("retried"))
    (leased,) = lease(db, agent)
    first = call(db, leases.confirm_start, agent, item.id, leased.fence)
    again = call(db, leases.confirm_start, agent, item.id, leased.fence)
    assert (again.state, again.started_at, again.fence) == ("running", first.started_at, first.fence)
    with pytest.raises(LeaseConflict, match="Stale fencing token"):
        call(db, leases.confirm_start, agent, item.id, leased.fence - 1)
    done = call(db, leases.finish, agent, item.id, leased.fence, WorkState.SUCCESS, None)
    assert call(db, leases.finish, agent, item.id, leased.fence, WorkState.SUCCESS, None).finished_at == done.finished_at
    with pytest.raises(LeaseConflict, match="is success, expected running"):
        call(db, leases.finish, agent, item.id, leased.fence, WorkState.FAILED, "late")
    with pytest.raises(LeaseConflict, match="is success, expected leased"):
        call(db, leases.confirm_start, agent, item.id, leased.fence)
