"""The weight-sync wire protocol between two real processes over a standalone gloo group."""

import multiprocessing as mp
import time

import pytest
import torch

from rlhf_ray.net import bind_listener
from rlhf_ray.weight_sync import (
    NCCL_WATCHDOG_MARGIN_S,
    SyncGroupSpec,
    TensorMeta,
    abort_group,
    combine_ranks,
    compare_checksums,
    expected_layer_sums,
    host_timeout,
    join_sync_group,
    layer_checksums,
    layer_of,
    param_sums,
    plan_buckets,
    post_receive,
    sample_columns,
    send_bucket,
    wait_all,
)


def _named_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(50, 8, generator=g)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8, generator=g)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(8, generator=g)),
        ("model.layers.0.mlp.step", torch.arange(3, dtype=torch.int64)),
        ("model.layers.1.mlp.up_proj.weight", torch.randn(16, 8, generator=g).to(torch.bfloat16)),
        ("model.layers.1.mlp.down_proj.weight", torch.randn(16, 8, generator=g).t()),  # not contiguous
        ("model.norm.weight", torch.randn(8, generator=g)),
    ]


def _receiver(spec: SyncGroupSpec, plan: list[list[TensorMeta]], queue) -> None:
    """Receives as a rollout actor does: the next bucket is posted before the current one is read."""
    pg = join_sync_group(spec, rank=1)
    got = []
    pending = post_receive(pg, plan[0])
    for k in range(len(plan)):
        named, works = pending
        wait_all(works)
        if k + 1 < len(plan):
            pending = post_receive(pg, plan[k + 1])
        got += named
    queue.put(got)


def test_plan_buckets_respects_size_and_order():
    metas = [TensorMeta.of(n, t) for n, t in _named_tensors()]
    plan = plan_buckets(metas, bucket_bytes=400)
    assert [m for b in plan for m in b] == metas
    for bucket in plan:
        layers = {layer_of(m.name) for m in bucket}
        assert len(layers) == 1 or sum(m.nbytes for m in bucket) <= 400
    # a layer is never split across buckets (vLLM reloads fused modules whole)
    home = {}
    for i, bucket in enumerate(plan):
        for m in bucket:
            assert home.setdefault(layer_of(m.name), i) == i
    assert metas[0].nbytes == 50 * 8 * 4


def test_broadcast_round_trip_between_processes():
    named = _named_tensors()
    plan = plan_buckets([TensorMeta.of(n, t) for n, t in named], bucket_bytes=600)
    listen_fd, port = bind_listener("127.0.0.1")
    spec = SyncGroupSpec("127.0.0.1", port, 2, "gloo", 30.0, generation=0)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(spec, plan, queue))
    proc.start()
    pg = join_sync_group(spec, rank=0, listen_fd=listen_fd)
    lookup = dict(named)
    for bucket in plan:
        wait_all(send_bucket(pg, [(m.name, lookup[m.name]) for m in bucket]))
    got = queue.get(timeout=60)
    proc.join(timeout=30)
    assert [n for n, _ in got] == [n for n, _ in named]
    for (_, want), (_, have) in zip(named, got):
        assert have.dtype == want.dtype and torch.equal(have, want)
    compare_checksums(layer_checksums(named), layer_checksums(got), who="receiver")


def test_checksum_mismatch_names_actor_and_layer():
    named = _named_tensors()
    bad = [(n, t + 1 if n.startswith("model.layers.1") else t) for n, t in named]
    with pytest.raises(RuntimeError, match=r"rollout-1: layer 'model.layers.1'"):
        compare_checksums(layer_checksums(named), layer_checksums(bad), who="rollout-1")


def test_layer_of_groups_fused_and_unfused_names():
    assert layer_of("model.layers.3.self_attn.qkv_proj.weight") == "model.layers.3"
    assert layer_of("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert layer_of("model.embed_tokens.weight") == "model.embed_tokens"


def test_sampled_columns_are_shared_by_version_and_fresh_per_version():
    cols = sample_columns(512, version=3, count=32)
    assert cols == sample_columns(512, version=3, count=32) and len(set(cols)) == 32 and cols == sorted(cols)
    assert all(0 <= c < 512 for c in cols)
    assert cols != sample_columns(512, version=4, count=32)
    assert sample_columns(16, version=3, count=32) == list(range(16))  # narrower than the sample: every column
    assert sample_columns(512, version=3, count=0) == list(range(512))


def test_expected_layer_sums_against_a_plain_loop():
    """A fused qkv weight read back on sampled columns sums exactly what the learner's q, k and v weights hold there."""
    g = torch.Generator().manual_seed(5)
    named = [
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 6, generator=g)),
        ("model.layers.0.self_attn.k_proj.weight", torch.randn(4, 6, generator=g)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(8, generator=g)),
        ("model.layers.0.input_layernorm.weight", torch.randn(6, generator=g)),
        ("model.embed_tokens.weight", torch.randn(10, 6, generator=g)),
    ]
    sums = param_sums(named, version=7, columns=3)
    cols = sample_columns(6, 7, 3)
    qk = torch.cat([named[0][1], named[1][1]])  # vLLM's fused rows
    readback = 0.0  # what the actor reads through the kernel: column c of the fused weight, for each sampled c
    for c in cols:
        for row in range(qk.shape[0]):
            readback += float(qk[row, c])
    rest = float(named[2][1].double().sum() + named[3][1].double().sum())
    got = expected_layer_sums(sums, ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"])
    assert got["model.layers.0"] == pytest.approx(readback + rest, abs=1e-9)
    assert got["model.embed_tokens"] == pytest.approx(float(named[4][1].double().sum()), abs=1e-9)  # summed whole
    assert expected_layer_sums(sums, []) == pytest.approx(layer_checksums(named), abs=1e-9)


def test_tensor_parallel_sums_add_shards_and_count_replicas_once():
    full = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    shards = full.chunk(2, dim=1)  # a row-parallel weight split over 2 ranks
    norm = torch.tensor([0.5, 1.5])
    per_rank = [{"w": float(s.sum()), "norm": float(norm.sum())} for s in shards]
    assert combine_ranks(per_rank) == {"w": float(full.sum()), "norm": 2.0}
    per_rank[1]["norm"] = 2.5  # a replica that drifted is counted twice, so it cannot match the learner's sum
    assert combine_ranks(per_rank)["norm"] == 4.5
    assert combine_ranks(per_rank[:1]) == per_rank[0]


def _silent_sender(ports, done) -> None:
    """Rank 0 of a group that never sends (a learner that hung or died): its peer's receives never finish."""
    listen_fd, port = bind_listener("127.0.0.1")
    ports.put(port)
    pg = join_sync_group(SyncGroupSpec("127.0.0.1", port, 2, "gloo", 120.0, generation=0), rank=0, listen_fd=listen_fd)
    done.wait(60)
    del pg


def test_host_deadline_aborts_a_collective_whose_peer_never_sends():
    """The NCCL path of `wait_all` (poll on the host, abort past the deadline), run over a gloo group whose own
    timeout is far longer: it must raise at the host deadline, not at the group's timeout."""
    ctx = mp.get_context("spawn")
    ports, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_silent_sender, args=(ports, done))
    proc.start()
    try:
        spec = SyncGroupSpec("127.0.0.1", ports.get(timeout=60), 2, "gloo", 120.0, generation=0)
        pg = join_sync_group(spec, rank=1)
        _, works = post_receive(pg, [TensorMeta("model.norm.weight", (8,), "float32")])
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"weight_sync.timeout_s=1.5s .*the group was aborted"):
            wait_all(works, host_timeout_s=1.5, pg=pg)
        assert 1.5 <= time.monotonic() - start < 10.0
        abort_group(pg)  # a second abort (the group being rebuilt) is harmless
    finally:
        done.set()
        proc.join(timeout=30)


def test_host_deadline_passes_finished_works_through():
    listen_fd, port = bind_listener("127.0.0.1")
    pg = join_sync_group(SyncGroupSpec("127.0.0.1", port, 1, "gloo", 30.0, generation=0), rank=0, listen_fd=listen_fd)
    t = torch.arange(4.0)
    wait_all(send_bucket(pg, [("w", t)]), host_timeout_s=5.0, pg=pg)
    assert torch.equal(t, torch.arange(4.0))


def test_group_timeouts_leave_nccl_a_watchdog_margin_and_gloo_unchanged():
    gloo = SyncGroupSpec("127.0.0.1", 1, 2, "gloo", 30.0, generation=0)
    nccl = SyncGroupSpec("127.0.0.1", 1, 2, "nccl", 30.0, generation=0)
    assert gloo.group_timeout_s == 30.0 and host_timeout(gloo) is None  # gloo's wait() blocks the host
    assert host_timeout(nccl) == 30.0 and nccl.group_timeout_s == 30.0 + NCCL_WATCHDOG_MARGIN_S
