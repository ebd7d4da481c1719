"""The layer-by-layer runner on tiny models of every supported architecture."""
import pytest
import torch

from slimlm.calibration import RunnerOptions, find_blocks, run_layerwise

from conftest import random_windows, tiny_model


class Recorder:
    """A processor that changes nothing and records what it is shown."""

    def __init__(self, needs=("hessian",), sequential=True):
        self.needs = frozenset(needs)
        self.sequential = sequential
        self.block_inputs, self.groups = {}, []

    def process(self, ctx, group):
        self.block_inputs.setdefault(ctx.index, torch.cat(ctx.inputs))
        self.groups.append((ctx.index, [info.name for info, _ in group], group[0][1]))


def test_block_inputs_match_the_model_on_every_architecture(arch):
    model = tiny_model(arch)
    w = random_windows(6, 32)
    with torch.no_grad():
        hidden = model(w, output_hidden_states=True).hidden_states
    rec = Recorder()
    run_layerwise(model, w, rec, RunnerOptions(batch_size=4, fast=False, progress=False, stash_bf16=False))
    _, blocks = find_blocks(model)
    assert sorted(rec.block_inputs) == list(range(len(blocks)))
    for i, x in rec.block_inputs.items():
        torch.testing.assert_close(x, hidden[i], rtol=1e-5, atol=1e-5)
    # every linear layer of every block was shown exactly once
    names = [n for _, g, _ in rec.groups for n in g]
    linears = [n for n, m in model.named_modules() if n.startswith(find_blocks(model)[0])
               and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")]
    assert sorted(names) == sorted(linears)


def test_groups_share_inputs_in_execution_order():
    model = tiny_model("llama")
    rec = Recorder()
    run_layerwise(model, random_windows(4, 16), rec, RunnerOptions(fast=False, progress=False))
    block0 = [[n.rsplit(".", 1)[-1] for n in g] for i, g, _ in rec.groups if i == 0]
    assert block0 == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_statistics_equal_direct_computation():
    model = tiny_model("qwen2")
    w = random_windows(4, 16)
    captured = {}
    lin = model.model.layers[1].mlp.down_proj

    def keep(_m, a):
        captured["x"] = a[0].reshape(-1, a[0].shape[-1])
    h = lin.register_forward_pre_hook(keep)
    with torch.no_grad():
        model(w)
    h.remove()
    x = captured["x"].double()
    rec = Recorder(needs=("hessian", "sq_sum", "abs_sum"))
    run_layerwise(model, w, rec, RunnerOptions(batch_size=4, fast=False, progress=False, stash_bf16=False))
    st = [s for i, g, s in rec.groups if i == 1 and g[0].endswith("down_proj")][0]
    assert st.nsamples == x.shape[0]
    torch.testing.assert_close(st.hessian.double(), 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st.sq_sum.double(), (x ** 2).sum(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st.abs_sum.double(), x.abs().sum(0), rtol=1e-4, atol=1e-6)


def test_fast_mode_stays_close_to_fp32():
    model = tiny_model("llama")
    w = random_windows(4, 32)
    exact, fast = Recorder(), Recorder()
    run_layerwise(model, w, exact, RunnerOptions(fast=False, progress=False))
    run_layerwise(model, w, fast, RunnerOptions(fast=True, fast_stats=True, progress=False))
    assert [g[:2] for g in exact.groups] == [g[:2] for g in fast.groups] and exact.groups
    for (_, _, a), (_, _, b) in zip(exact.groups, fast.groups):
        rel = (a.hessian - b.hessian).norm() / a.hessian.norm()
        assert rel < 0.05


def test_sequential_groups_see_rewritten_weights():
    """With true-sequential order, the o_proj statistics come from the already-rewritten q/k/v."""
    class Zeroer(Recorder):
        def process(self, ctx, group):
            super().process(ctx, group)
            for info, _ in group:
                if info.name.endswith("v_proj"):
                    info.set_weight(torch.zeros_like(info.weight()))

    rec = Zeroer(needs=("sq_sum",), sequential=True)
    run_layerwise(tiny_model("llama"), random_windows(4, 16), rec, RunnerOptions(fast=False, progress=False))
    o_stats = [s for i, g, s in rec.groups if i == 0 and g[0].endswith("o_proj")][0]
    assert o_stats.sq_sum.abs().max() == 0  # attention output is a mix of v's, now all zero

    rec2 = Zeroer(needs=("sq_sum",), sequential=False)
    run_layerwise(tiny_model("llama"), random_windows(4, 16), rec2, RunnerOptions(fast=False, progress=False))
    o_stats2 = [s for i, g, s in rec2.groups if i == 0 and g[0].endswith("o_proj")][0]
    assert o_stats2.sq_sum.abs().max() > 0  # one pass: o_proj's inputs were gathered before the rewrite


def test_unknown_statistic_rejected():
    with pytest.raises(ValueError, match="unknown statistics"):
        run_layerwise(tiny_model("llama"), random_windows(2, 8), Recorder(needs=("bogus",)),
                      RunnerOptions(progress=False))


def test_hessians_stay_positive_semidefinite_under_bf16_passes():
    """Regression: the hooks run inside the forward's bf16 autocast; X^T X must still be an fp32 product
    (a bf16 product made SmolLM2's o_proj Hessians indefinite, and GPTQ fell back to heavy damping)."""
    rec = Recorder()
    run_layerwise(tiny_model("llama"), random_windows(8, 64), rec, RunnerOptions(fast=True, progress=False))
    for _, names, st in rec.groups:
        ev = torch.linalg.eigvalsh(st.hessian.double())
        assert ev.min() >= -1e-9 * ev.max(), (names, ev.min().item(), ev.max().item())


class DtypeRecorder(Recorder):
    """Records the dtype of the block's linear inputs as the forward computes them."""

    def __init__(self):
        super().__init__(needs=("sq_sum",), sequential=False)
        self.dtypes = set()

    def process(self, ctx, group):
        info = group[0][0]
        h = info.module.register_forward_hook(lambda m, a, out: self.dtypes.add(out.dtype))
        try:
            ctx.forward(batches=[0])
        finally:
            h.remove()


@pytest.mark.parametrize("native", [True, False])
def test_passes_use_bf16_only_where_the_device_has_it(monkeypatch, native):
    """fast=None (the default) follows the machine: bf16 autocast where bf16 is native, fp32 elsewhere
    (on an AVX2-only CPU bf16 products are emulated and ~7x slower than fp32)."""
    import slimlm.hardware as hw
    from slimlm.calibration import passes_in_bf16

    monkeypatch.setattr(hw, "native_bf16", lambda device="cpu": native)
    opts = RunnerOptions(progress=False)
    assert passes_in_bf16(opts) is native
    assert passes_in_bf16(RunnerOptions(fast=False)) is False
    assert passes_in_bf16(RunnerOptions(fast=True)) is True
    rec = DtypeRecorder()
    run_layerwise(tiny_model("llama"), random_windows(2, 16), rec, opts)
    assert rec.dtypes == {torch.bfloat16 if native else torch.float32}


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch):
    import slimlm.hardware as hw

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    monkeypatch.setattr(hw, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not hw.cpu_has_native_bf16()
    monkeypatch.setattr(hw, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert hw.cpu_has_native_bf16()
    monkeypatch.setattr(hw, "_cpu_flags", lambda: frozenset({"fp", "asimd", "bf16"}))   # Arm
    assert hw.cpu_has_native_bf16()


class DownZeroer(Recorder):
    """Zeroes every block's down_proj (so the compressed model's activations differ from the dense one's)."""

    def process(self, ctx, group):
        self.groups.append((ctx.index, [info.name for info, _ in group], group[0][1]))
        for info, _ in group:
            if info.name.endswith("down_proj"):
                info.set_weight(torch.zeros_like(info.weight()))


def _dense_qkv_sq_sums(model, w):
    """sum_t x_t^2 of every block's q_proj input in the untouched model."""
    sums, hooks = {}, []
    for i, b in enumerate(model.model.layers):
        def pre(_m, a, _i=i):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            sums[_i] = sums.get(_i, 0) + (x ** 2).sum(0)
        hooks.append(b.self_attn.q_proj.register_forward_pre_hook(pre))
    with torch.no_grad():
        model(w)
    for h in hooks:
        h.remove()
    return sums


def _run_counting(propagate, w):
    """(statistics seen per block's q/k/v group, the dense model's, block forwards started per block)."""
    model = tiny_model("llama")
    dense = _dense_qkv_sq_sums(model, w)
    starts = []
    hooks = [b.register_forward_pre_hook(lambda *_a, _i=i: starts.append(_i))
             for i, b in enumerate(model.model.layers)]
    rec = DownZeroer(needs=("sq_sum",), sequential=False)
    run_layerwise(model, w, rec, RunnerOptions(batch_size=2, fast=False, progress=False, propagate=propagate))
    for h in hooks:
        h.remove()
    seen = {i: s.sq_sum.double() for i, g, s in rec.groups if g[0].endswith("q_proj")}
    return seen, dense, {i: starts.count(i) for i in range(len(model.model.layers))}


def test_dense_propagation_calibrates_on_the_dense_activations_in_one_forward():
    w = random_windows(6, 16)   # 3 batches of 2
    seen_d, dense, starts_d = _run_counting("dense", w)
    seen_c, _, starts_c = _run_counting("compressed", w)
    n_blocks = len(dense)
    assert n_blocks > 1 and sorted(seen_d) == sorted(seen_c) == list(range(n_blocks))
    for i in range(n_blocks):
        # dense: every block sees the untouched model's activations although each down_proj was zeroed
        torch.testing.assert_close(seen_d[i], dense[i], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen_c[0], dense[0], rtol=1e-5, atol=1e-6)
    for i in range(1, n_blocks):   # compressed: later blocks see the rewritten model
        assert not torch.allclose(seen_c[i], dense[i], rtol=1e-3, atol=1e-4)
    # one propagation pass (3 batches) fewer for every block but the last, which propagates nothing either way
    assert {i: starts_c[i] - starts_d[i] for i in range(n_blocks)} == {
        i: (3 if i + 1 < n_blocks else 0) for i in range(n_blocks)}


def test_dense_propagation_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="propagate must be"):
        RunnerOptions(propagate="sideways")
    with pytest.raises(ValueError, match="true-sequential"):
        run_layerwise(tiny_model("llama"), random_windows(2, 8), Recorder(sequential=True),
                      RunnerOptions(progress=False, propagate="dense"))

    class Runs(Recorder):
        def process(self, ctx, group):
            ctx.forward(batches=[0])

    with pytest.raises(RuntimeError, match="propagate='compressed'"):
        run_layerwise(tiny_model("llama"), random_windows(2, 8), Runs(sequential=False),
                      RunnerOptions(fast=False, progress=False, propagate="dense"))


@pytest.mark.parametrize("d", [64, 200, 576, 800])
def test_gram_upper_matches_the_full_product(d):
    """The strip split (up to 8 strips of ~96 rows, bounds not dividing d evenly) fills the upper triangle."""
    from slimlm.calibration import gram_upper_, mirror_upper_
    g = torch.Generator().manual_seed(d)
    x = torch.randn(300, d, generator=g, dtype=torch.float64)
    acc = torch.zeros(d, d, dtype=torch.float64)
    gram_upper_(acc, x[:150])
    gram_upper_(acc, x[150:])
    mirror_upper_(acc)
    torch.testing.assert_close(acc, x.T @ x)


@pytest.mark.parametrize("sequential", [False, True])
def test_first_batch_statistics_come_from_discovery_exactly_once(sequential):
    """Batch 0's statistics are gathered by the discovery pass and not again: over several batches, each
    group's Hessian and count equal the direct computation (sequential: the first group is seeded)."""
    model = tiny_model("llama")
    w = random_windows(6, 16)
    xs = {}

    def keep(name):
        def pre(_m, a):
            xs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]).double())
        return pre
    layer = model.model.layers[1]
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(keep("q")),
             layer.mlp.gate_proj.register_forward_pre_hook(keep("gate"))]
    with torch.no_grad():
        model(w)
    for h in hooks:
        h.remove()
    rec = Recorder(needs=("hessian", "sq_sum"), sequential=sequential)
    run_layerwise(model, w, rec, RunnerOptions(batch_size=2, fast=False, progress=False, stash_bf16=False))
    for key, leaf in (("q", "q_proj"), ("gate", "gate_proj")):
        x = torch.cat(xs[key])
        st = [s for i, g, s in rec.groups if i == 1 and g[0].endswith(leaf)][0]
        assert st.nsamples == x.shape[0] == 6 * 16
        torch.testing.assert_close(st.hessian.double(), 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.sq_sum.double(), (x ** 2).sum(0), rtol=1e-4, atol=1e-6)


def test_a_module_called_twice_falls_back_to_running_batch_zero():
    """When a linear layer runs twice in a block, discovery gathers no statistics and every batch is run
    (a batch-0 seed would hold only the first of gate_proj's three calls)."""
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    orig = mlp.forward

    def thrice(x):
        mlp.gate_proj(x * 2)          # gate_proj runs three times per batch before down_proj
        mlp.gate_proj(x * 3)
        return orig(x)
    mlp.forward = thrice
    rec = Recorder(needs=("sq_sum",), sequential=False)
    run_layerwise(model, random_windows(4, 8), rec, RunnerOptions(batch_size=2, fast=False, progress=False))
    st = [s for i, g, s in rec.groups if i == 0 and g[0].endswith("gate_proj")][0]
    assert st.nsamples == 3 * 4 * 8


class HalfZeroer(Recorder):
    """Rewrites every weight it is shown (zeroes the smaller half of each row) and keeps a copy of the
    statistics, so that later groups' statistics depend on the rewrites."""

    def process(self, ctx, group):
        super().process(ctx, group)
        for info, _ in group:
            W = info.weight()
            thr = W.abs().median(dim=1, keepdim=True).values
            info.set_weight(torch.where(W.abs() >= thr, W, torch.zeros_like(W)))


def _run_sequential(arch, staged, stash_bf16=False, batch_size=2):
    model = tiny_model(arch)
    w = random_windows(6, 16)
    rec = HalfZeroer(needs=("hessian", "sq_sum"), sequential=True)
    calls = {}
    hooks = [m.register_forward_hook(lambda *_a, _n=n: calls.__setitem__(_n, calls.get(_n, 0) + 1))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    run_layerwise(model, w, rec, RunnerOptions(batch_size=batch_size, fast=False, progress=False,
                                               staged=staged, stash_bf16=stash_bf16))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        logits = model(w).logits
    return rec, calls, logits


@pytest.mark.parametrize("staged,sequential", [(True, True), (False, True), (False, False)])
def test_skipped_positions_stay_out_of_every_statistic(staged, sequential):
    """skip_positions=k: every group's statistics are those of its inputs at positions k.. of each window
    (the first k positions still run through the model), on every pass: discovery, statistics, staged."""
    model = tiny_model("llama")
    w = random_windows(6, 16)
    captured = {}

    def keep(_m, a, _n):
        captured[_n] = a[0][:, 2:].reshape(-1, a[0].shape[-1])
    hooks = [m.register_forward_pre_hook(lambda _m, a, _n=n: keep(_m, a, _n))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        model(w)
    for h in hooks:
        h.remove()
    rec = Recorder(needs=("hessian", "abs_sum"), sequential=sequential)
    run_layerwise(model, w, rec, RunnerOptions(batch_size=4, fast=False, progress=False, stash_bf16=False,
                                               staged=staged, skip_positions=2))
    assert len(rec.groups) == 8
    for _, names, st in rec.groups:
        x = captured[names[0]].double()
        assert st.nsamples == 6 * 14 == x.shape[0]
        torch.testing.assert_close(st.hessian.double(), 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.abs_sum.double(), x.abs().sum(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="skip_positions"):
        RunnerOptions(skip_positions=-1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
def test_staged_passes_equal_the_generic_true_sequential_passes(arch):
    """Each group's statistics, the rewritten model, and what each block is shown are those of the generic
    true-sequential passes (one partial forward per group), while each linear layer runs once per batch."""
    staged, calls_s, logits_s = _run_sequential(arch, staged=True)
    generic, calls_g, logits_g = _run_sequential(arch, staged=False)
    assert [(i, g) for i, g, _ in staged.groups] == [(i, g) for i, g, _ in generic.groups]
    for (_, _, a), (_, _, b) in zip(staged.groups, generic.groups):
        assert a.nsamples == b.nsamples
        torch.testing.assert_close(a.hessian, b.hessian, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.sq_sum, b.sq_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_s, logits_g, rtol=1e-5, atol=1e-5)
    for i, x in generic.block_inputs.items():
        torch.testing.assert_close(staged.block_inputs[i], x, rtol=1e-5, atol=1e-5)
    # the last block (nothing to propagate), 3 batches: besides batch 0 in the capture pass, q/k/v run once per
    # batch (gathering o_proj's inputs) and o_proj once per batch; the generic passes run batch 0 in a discovery
    # pass too (the staged ones only on the first block), then q/k/v again for gate/up's and down's
    # statistics, and o_proj again for down's
    last = len(find_blocks(tiny_model(arch))[1]) - 1
    o = [n for n in calls_s if n.endswith(f"layers.{last}.self_attn.o_proj")][0]
    q = [n for n in calls_s if f"layers.{last}.self_attn." in n and n != o][0]
    assert calls_s[q] == 1 + 3 and calls_g[q] == 2 + 3 * 3
    assert calls_s[o] == 1 + 3 and calls_g[o] == 2 + 2 * 3


@pytest.mark.parametrize("arch", ["gemma3", "gpt2", "opt"])
def test_staged_passes_fall_back_where_the_block_is_laid_out_otherwise(arch, caplog):
    """Gemma 3 has Llama's module names but extra norms around the MLP: the check on batch 0 refuses the staged
    arithmetic; GPT-2 and OPT do not have the layout at all. Either way the result is the generic one."""
    import logging
    with caplog.at_level(logging.INFO, logger="slimlm.calibration"):
        staged, _, logits_s = _run_sequential(arch, staged=True)
    generic, _, logits_g = _run_sequential(arch, staged=False)
    if arch == "gemma3":
        assert "do not reproduce" in caplog.text
    torch.testing.assert_close(logits_s, logits_g, rtol=1e-6, atol=1e-6)
    assert [g[:2] for g in staged.groups] == [g[:2] for g in generic.groups] and staged.groups
    for (_, _, a), (_, _, b) in zip(staged.groups, generic.groups):
        torch.testing.assert_close(a.hessian, b.hessian, rtol=1e-6, atol=1e-7)


def test_staged_bf16_stash_rounds_only_the_propagated_down_inputs():
    """With stash_bf16 the next block's inputs carry the bf16 rounding of down_proj's inputs (close, not equal);
    the statistics of the block itself are gathered before the rounding and stay exact."""
    exact, _, _ = _run_sequential("llama", staged=True)
    rounded, _, _ = _run_sequential("llama", staged=True, stash_bf16=True)
    a, b = exact.block_inputs[1], rounded.block_inputs[1]
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 1e-2
    assert [g[:2] for g in exact.groups] == [g[:2] for g in rounded.groups]
    assert any(g[0] == 0 for g in exact.groups)
    for (i, _, x), (_, _, y) in zip(exact.groups, rounded.groups):
        if i == 0:
            torch.testing.assert_close(x.hessian, y.hessian, rtol=1e-6, atol=1e-7)


def test_stashes_reuse_one_arena_and_grow_it_when_needed():
    """Successive stashes (the staged passes' z, then m) are carved from the same bytes; a larger one gets a
    larger buffer; a shorter last batch gets its own tensor; values and dtypes are what was put."""
    from slimlm.calibration.passes import _Arena, _Stash

    arena = _Arena()
    z = _Stash(3, arena=arena)
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    for b, x in enumerate(xs):
        z.put(b, x)
    assert all(torch.equal(z[b], x) for b, x in enumerate(xs))
    first = arena.buf.data_ptr()
    m = _Stash(3, torch.bfloat16, arena=arena)   # 3*2*5*8 bf16: half the bytes of z, same buffer
    for b in range(2):
        m.put(b, xs[b] * 2)
    m.put(2, torch.ones(1, 5, 8))               # a shorter last batch
    assert m.buf.data_ptr() == first and m.buf.dtype == torch.bfloat16
    assert torch.equal(m[0], (xs[0] * 2).to(torch.bfloat16)) and m[2].shape == (1, 5, 8)
    big = _Stash(3, arena=arena)
    big.put(0, torch.randn(4, 5, 8))            # more bytes than the arena holds: it grows
    assert arena.buf.numel() == 3 * 4 * 5 * 8 * 4 and big.buf.shape == (3, 4, 5, 8)
