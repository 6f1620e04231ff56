"""Redis keys built from user input never escape their owner's hash tag and
never collide across runs or tenants.

First as properties of the key builders (backends/redis.py) over hostile but
valid ids: every key of a run hashes to the run's slot, and its `{...}` tag,
cut by Redis's rule, is exactly `tenant/run`; distinct owners (runs, scopes,
tenants) get disjoint keys. Then through a real server on a 3-primary cluster,
with two tenants: runs, scopes, reservations, meters and approvals with
adversarial ids, and SCAN says which keys appeared, on which slot.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import string
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.cluster
from hypothesis import assume, given
from hypothesis import strategies as st
from redis.crc import key_slot

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server.auth import KeyEntry, Role, digest, new_key, write_keys
from runcap_server.backends.redis import RedisLedger
from runcap_server.ledger.types import ScopeKind, ScopeRef
from runcap_server.settings import Settings
from runcap_server.validation import Validator
from tests.fuzz.harness import FUZZ
from tests.fuzz.strategies import texts, valid_ids, valid_meters
from tests.redis_servers import RedisCluster
from tests.servers import ServerProcess

PARENT_KINDS = (ScopeKind.API_KEY, ScopeKind.USER, ScopeKind.TEAM)
# All an id may hold: no brace opens or closes a hash tag, no "/" or "@" forges
# a key's structure, nothing invisible or outside ASCII.
ID_CHARS = frozenset(string.ascii_letters + string.digits + "._:-")


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the text between the first `{` and the first
    `}` after it, when that is not empty; otherwise the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def slot(text: str) -> int:
    return key_slot(text.encode())


@dataclass(frozen=True)
class Owner:
    """Something that owns keys: a run, a parent scope, or a tenant's indexes."""

    tenant: str
    kind: str  # "run", "scope", "runs" (ListRuns index) or "prices"
    ref: ScopeRef | None = None

    def keys(self, ledger: RedisLedger) -> list[str]:
        if self.kind == "run":
            assert self.ref is not None
            return ledger._keys(self.tenant, self.ref.id)
        if self.kind == "scope":
            assert self.ref is not None
            return ledger._scope_keys(self.tenant, self.ref)
        if self.kind == "runs":
            return [ledger._runs_index(self.tenant)]
        return [ledger._prices_key(self.tenant)]

    def tag(self) -> str:
        if self.kind == "run":
            assert self.ref is not None
            return f"{self.tenant}/{self.ref.id}"
        if self.kind == "scope":
            assert self.ref is not None
            return f"{self.tenant}/@{self.ref.token}"
        return f"{self.tenant}/@{self.kind}"


def owners() -> st.SearchStrategy[Owner]:
    run = st.builds(
        lambda t, r: Owner(t, "run", ScopeRef(ScopeKind.RUN, r)), valid_ids(), valid_ids()
    )
    scope = st.builds(
        lambda t, k, i: Owner(t, "scope", ScopeRef(k, i)),
        valid_ids(),
        st.sampled_from(PARENT_KINDS),
        valid_ids(),
    )
    index = st.builds(Owner, valid_ids(), st.sampled_from(("runs", "prices")))
    return st.one_of(run, scope, index)


LEDGER = RedisLedger(url="redis://unused", default_ttl_ms=60_000)


@FUZZ
@given(text=texts())
def test_the_edge_lets_no_tag_breaker_into_an_id(text: str) -> None:
    """Ids (runs, reservations, tenants, scopes) and meter names that pass
    validation cannot open, close or forge a hash tag or a key's separators."""
    check = Validator()
    check.identifier("id", text)
    if not check.violations:
        assert set(text) <= ID_CHARS
    check = Validator()
    check.meter("meter", text)
    if not check.violations:
        # Stored inside a run's values too, where ; = , separate dimensions.
        assert set(text) <= ID_CHARS | {"/"}


@FUZZ
@given(text=texts())
def test_the_servers_own_tenant_and_namespace_keep_tags_whole(text: str) -> None:
    """RUNCAP_TENANT (the tenant without keys) and RUNCAP_REDIS_NAMESPACE are
    in every key too: settings refuse what would break a tag."""
    with contextlib.suppress(ValueError):
        Settings(tenant=text)
        assert set(text) <= ID_CHARS
    with contextlib.suppress(ValueError):
        Settings(redis_namespace=text)
        assert text
        assert not set("{}") & set(text)


@FUZZ
@given(owner=owners())
def test_every_key_hashes_to_its_owners_tag(owner: Owner) -> None:
    for key in owner.keys(LEDGER):
        assert hash_tag(key) == owner.tag(), key
        assert slot(key) == slot(owner.tag()), key


@FUZZ
@given(a=owners(), b=owners())
def test_distinct_owners_never_share_a_key_or_a_tag(a: Owner, b: Owner) -> None:
    assume(a != b)
    assert a.tag() != b.tag()
    assert not set(a.keys(LEDGER)) & set(b.keys(LEDGER))


def resplit() -> st.SearchStrategy[tuple[Owner, Owner]]:
    """Two runs whose tenant and run id, written one after the other, read the
    same: "a:b" + "c" and "a" + "b:c" (a separator moved across the boundary)."""
    atom = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9]{0,5}", fullmatch=True)

    def pair(atoms: list[str], sep: str, i: int, j: int) -> tuple[Owner, Owner]:
        def run(k: int) -> Owner:
            return Owner(sep.join(atoms[:k]), "run", ScopeRef(ScopeKind.RUN, sep.join(atoms[k:])))

        return run(i), run(j)

    return st.lists(atom, min_size=3, max_size=5).flatmap(
        lambda atoms: st.builds(
            pair,
            st.just(atoms),
            st.sampled_from(":.-_"),
            st.integers(1, len(atoms) - 1),
            st.integers(1, len(atoms) - 1),
        )
    )


@FUZZ
@given(pair=resplit())
def test_moving_a_separator_between_tenant_and_run_changes_every_key(
    pair: tuple[Owner, Owner],
) -> None:
    a, b = pair
    assume(a != b)
    assert not set(a.keys(LEDGER)) & set(b.keys(LEDGER))


@FUZZ
@given(owner=owners().filter(lambda o: o.kind in ("run", "scope")))
def test_the_sweeper_reads_back_the_owner_it_indexed(owner: Owner) -> None:
    """The due index stores "tenant/run" and "tenant/@kind:id"; the sweeper
    must expire exactly the run or scope that was indexed."""
    assert owner.ref is not None
    member = RedisLedger._member(owner.tenant, owner.ref)
    if owner.kind == "scope":
        tenant, _, token = member.partition("/@")
        assert (tenant, ScopeRef.parse(token)) == (owner.tenant, owner.ref)
    else:
        assert "/@" not in member
        assert member.partition("/") == (owner.tenant, "/", owner.ref.id)


# --- the same through a real server on a cluster ---------------------------------------

# Two tenants whose names differ by a separator, and runs alike in both.
TENANTS = ("acme", "acme:x")
INTERNAL_TAG = re.compile(r"(?:(?:acme|acme:x)/)?@[a-z]+")
SUFFIX = re.compile(r":[a-z]+")


@dataclass
class Cluster:
    server: ServerProcess
    redis: redis.cluster.RedisCluster
    namespace: str
    channel: grpc.Channel
    secrets: dict[str, str]
    examples: Iterator[int]

    def stub(self) -> BudgetServiceStub:
        return BudgetServiceStub(self.channel)

    def as_(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.secrets[tenant]}"),)

    def keys(self) -> set[str]:
        due = f"{self.namespace}:due:"
        found = self.redis.scan_iter(match=f"{self.namespace}:*", count=1000)
        return {k.decode() for k in found if not k.decode().startswith(due)}


@pytest.fixture(scope="module")
def cluster(
    redis_cluster: RedisCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    directory: Path = tmp_path_factory.mktemp("keys")
    secrets = {tenant: new_key(f"admin-{n}") for n, tenant in enumerate(TENANTS)}
    write_keys(
        directory / "keys.json",
        [
            KeyEntry(id=f"admin-{n}", sha256=digest(secrets[t]), tenant=t, role=Role.ADMIN)
            for n, t in enumerate(TENANTS)
        ],
    )
    namespace = f"ks-{uuid.uuid4().hex[:8]}"
    server = ServerProcess(
        None,
        env={
            "RUNCAP_BACKEND": "redis",
            "RUNCAP_REDIS_CLUSTER_NODES": ",".join(redis_cluster.startup_nodes),
            "RUNCAP_REDIS_NAMESPACE": namespace,
            "RUNCAP_API_KEYS_FILE": str(directory / "keys.json"),
        },
    )
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url)
    try:
        server.start()
        with grpc.insecure_channel(server.target) as channel:
            yield Cluster(server, client, namespace, channel, secrets, itertools.count())
    finally:
        client.close()
        server.stop()


@FUZZ
@given(
    run=valid_ids(),
    reservation=valid_ids(),
    team=valid_ids(),
    meter=valid_meters(),
)
def test_keys_of_adversarial_ids_stay_in_their_tag_on_a_cluster(
    cluster: Cluster, run: str, reservation: str, team: str, meter: str
) -> None:
    """A run with every kind of user-chosen id, in both tenants: the keys that
    appear are the run's, its team's and the tenant's index, each on its tag's
    slot (CLUSTER KEYSLOT), and one tenant never sees the other's run."""
    n = next(cluster.examples)
    # Unique per example (hypothesis repeats ids), still valid: at most 128.
    run, team = f"{run[:100]}.{n}", f"{team[:100]}.{n}"
    approval = f"{run}/approval:meter:{meter}"
    stub = cluster.stub()
    before = cluster.keys()
    for tenant in TENANTS:
        auth = cluster.as_(tenant)
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetRun(pb.GetRunRequest(run_id=run), metadata=auth)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # not the other tenant's
        stub.CreateRun(
            pb.CreateRunRequest(
                run_id=run,
                limit_micros=1_000_000,
                team_id=team,
                policy=budget_pb2.RunPolicy(approved_meters=["tool:none"]),
            ),
            metadata=auth,
        )
        asked = stub.Reserve(
            pb.ReserveRequest(
                run_id=run, reservation_id=reservation, amount_micros=10, meter=meter
            ),
            metadata=auth,
        )
        assert asked.decision == budget_pb2.DECISION_APPROVAL_REQUIRED
        assert asked.approval_id == approval
        stub.Approve(pb.ApproveRequest(approval_id=approval), metadata=auth)
        held = stub.Reserve(
            pb.ReserveRequest(
                run_id=run, reservation_id=f"{reservation[:100]}.2", amount_micros=10, meter=meter
            ),
            metadata=auth,
        )
        assert held.decision == budget_pb2.DECISION_ALLOW
        stub.Commit(
            pb.CommitRequest(run_id=run, reservation_id=held.reservation_id, actual_micros=5),
            metadata=auth,
        )
    new = cluster.keys() - before
    runs = {f"{t}/{run}" for t in TENANTS}
    teams = {f"{t}/@team:{team}" for t in TENANTS}
    for key in new:
        tag = hash_tag(key)
        # The run's keys, its team's, or the server's own indexes (a tenant's,
        # like "{acme/@runs}", or global): no other tag can hold user input.
        assert tag in runs | teams or INTERNAL_TAG.fullmatch(tag), key
        assert SUFFIX.fullmatch(key.removeprefix(f"{cluster.namespace}:{{{tag}}}")), key
        assert cluster.redis.cluster_keyslot(key) == slot(tag), key
    assert runs | teams <= {hash_tag(key) for key in new}
    builder = RedisLedger(url="redis://unused", default_ttl_ms=60_000, namespace=cluster.namespace)
    for tenant in TENANTS:
        appeared = {k for k in new if hash_tag(k) == f"{tenant}/{run}"}
        assert appeared <= set(builder._keys(tenant, run)), sorted(appeared)
