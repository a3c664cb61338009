"""Mamba2 (lmlab.models.mamba2): the chunked SSD scan against the step-by-step recurrence, a naive quadratic
reference, packed documents, continuation from a state, gradients, long-sequence stability, init."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.config import ModelConfig, RecurrentConfig
from lmlab.models.mamba2 import Mamba2, segsum, ssd_chunked, ssd_step
from lmlab.models.recurrent import build_mixer, doc_resets, state_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def make(chunk=8, dim=16, head_dim=8, state_dim=4, conv_width=4, dtype=torch.float32, seed=0) -> Mamba2:
    """A tiny mixer with O(1) outputs, and every parameter random (decays from ~0.97 to ~0.1 per step)."""
    cfg = ModelConfig(dim=dim, recurrent=RecurrentConfig(head_dim=head_dim, state_dim=state_dim,
                                                         chunk_size=chunk, conv_width=conv_width))
    m = Mamba2(cfg, layer_id=0).to(dtype)
    g = torch.Generator().manual_seed(seed)
    m.reset_parameters(1 / math.sqrt(dim), 1 / math.sqrt(m.inner), generator=g)
    with torch.no_grad():
        for p, (lo, hi) in ((m.x_conv.bias, (-0.5, 0.5)), (m.bc_conv.bias, (-0.5, 0.5)), (m.dt_bias, (-2.0, 1.0)),
                            (m.D, (-1.0, 1.0)), (m.norm.weight, (0.5, 1.5))):
            p.uniform_(lo, hi, generator=g)
        m.A_log.uniform_(0.2, 2.0, generator=g).log_()
    return m


def loop(m: Mamba2, x: torch.Tensor, state=None):
    """The reference: one m.step per token."""
    state = m.init_state(x.shape[0], dtype=x.dtype) if state is None else state
    ys = []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


def random_state(m: Mamba2, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in m.init_state(batch).items()}


def close(a, b, atol=1e-5):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol:g}"


def close_state(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        close(a[k].float(), b[k].float(), atol)


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_forward_matches_step_by_step(chunk):
    torch.manual_seed(0)
    m = make(chunk=chunk)
    x = torch.randn(2, 37, 16)  # 37: not a multiple of 5 or 8, shorter than 64
    with torch.no_grad():
        y, state = m(x)
        y_ref, state_ref = loop(m, x)
    assert y.abs().mean() > 0.1  # O(1) outputs: the tolerance means something
    close(y, y_ref)
    close_state(state, state_ref)


def test_forward_from_a_state_matches_step_by_step():
    torch.manual_seed(1)
    m = make(chunk=8)
    x = torch.randn(2, 19, 16)
    s0 = random_state(m, 2, seed=1)
    with torch.no_grad():
        y, state = m(x, state=s0)
        y_ref, state_ref = loop(m, x, s0)
        y_zero, _ = m(x)
    close(y, y_ref)
    close_state(state, state_ref)
    assert (y - y_zero).abs().max() > 1e-2  # the initial state mattered


@pytest.mark.parametrize("k", [1, 8, 13])
def test_continuation_from_returned_state(k):
    torch.manual_seed(2)
    m = make(chunk=8)
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        y, state = m(x)
        y1, s1 = m(x[:, :k])
        y2, s2 = m(x[:, k:], state=s1)
    close(torch.cat([y1, y2], 1), y)
    close_state(s2, state)


def test_packed_rows_match_each_document_alone():
    torch.manual_seed(3)
    m = make(chunk=8)
    # row 0: documents of 11, 20, 14 tokens (starts 0, 11, 31: inside chunks); row 1: 8, 16, 21 (starts on chunk
    # boundaries 8 and 24). Row 0 starts a document at t = 0, so its given state is dropped; row 1 continues it.
    lengths = [[11, 20, 14], [8, 16, 21]]
    doc_ids = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lengths])
    resets = doc_resets(doc_ids)
    resets[1, 0] = False
    x = torch.randn(2, 45, 16)
    s0 = random_state(m, 2, seed=3)
    with torch.no_grad():
        y, state = m(x, resets=resets, state=s0)
        for r, row in enumerate(lengths):
            start = 0
            for d, n in enumerate(row):
                given = {k: v[r:r + 1] for k, v in s0.items()} if (r == 1 and d == 0) else None
                y_doc, s_doc = m(x[r:r + 1, start:start + n], state=given)
                close(y[r:r + 1, start:start + n], y_doc)
                start += n
            close_state({k: v[r:r + 1] for k, v in state.items()}, s_doc)  # the last document's state


def naive_ssd(x, dt, A, B, C, h0, resets):
    """The whole SSM as one materialised (T, T) decay matrix per head: L[i, j] = exp(cs[i] - cs[j]) for j <= i in the
    same document (cs = cumsum(dt A)), and the initial state read through exp(cs[i]) until the first reset."""
    b, t, h, p = x.shape
    cs = torch.cumsum(dt * A, dim=1).permute(0, 2, 1)  # (b, H, T)
    doc = torch.cumsum(resets.long(), dim=1)  # 0 = the initial state's document
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = causal & (doc[:, :, None] == doc[:, None, :])  # (b, T, T)
    diff = cs[:, :, :, None] - cs[:, :, None, :]
    L = torch.exp(torch.where(allowed[:, None], diff, float("-inf")))  # (b, H, T, T)
    scores = torch.einsum("bin,bjn->bij", C, B)[:, None] * L * dt.permute(0, 2, 1)[:, :, None, :]
    from_h0 = torch.exp(cs) * (doc == 0)[:, None, :]  # (b, H, T)
    y = torch.einsum("bhij,bjhp->bihp", scores, x)
    y = y + torch.einsum("bin,bhpn,bhi->bihp", C, h0, from_h0)
    last = L[:, :, -1, :] * dt.permute(0, 2, 1)  # (b, H, T): weight of x_j B_j^T in the final state
    final = torch.einsum("bhj,bjhp,bjn->bhpn", last, x, B) + from_h0[:, :, -1, None, None] * h0
    return y, final


def ssd_inputs(b=2, t=45, h=3, p=4, n=5, dtype=torch.float64, seed=4, dt_range=(0.01, 1.0), a_range=(0.5, 4.0)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=g, dtype=dtype)
    dt = torch.empty(b, t, h, dtype=dtype).uniform_(*dt_range, generator=g)
    A = -torch.empty(h, dtype=dtype).uniform_(*a_range, generator=g)
    B = torch.randn(b, t, n, generator=g, dtype=dtype)
    C = torch.randn(b, t, n, generator=g, dtype=dtype)
    h0 = torch.randn(b, h, p, n, generator=g, dtype=dtype)
    resets = torch.zeros(b, t, dtype=torch.bool)
    resets[0, [i for i in (5, 16, 30) if i < t]] = True  # inside chunks of 8, and one on a chunk start
    if b > 1:
        resets[1, [i for i in (0, 24) if i < t]] = True  # at t = 0 (drops h0) and on a chunk start
    return x, dt, A, B, C, h0, resets


def ssd_loop(x, dt, A, B, C, h0, resets):
    s, ys = h0, []
    for t in range(x.shape[1]):
        s = s * (~resets[:, t]).to(s.dtype)[:, None, None, None]
        y, s = ssd_step(s, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, 1), s


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_ssd_chunked_matches_naive_quadratic_and_loop(chunk):
    x, dt, A, B, C, h0, resets = ssd_inputs()
    y, s = ssd_chunked(x, dt, A, B, C, chunk, h0, resets)
    y_naive, s_naive = naive_ssd(x, dt, A, B, C, h0, resets)
    y_loop, s_loop = ssd_loop(x, dt, A, B, C, h0, resets)
    close(y_naive, y_loop, 1e-10)  # the two references agree
    close(s_naive, s_loop, 1e-10)
    close(y, y_naive, 1e-10)
    close(s, s_naive, 1e-10)


def test_segsum_is_the_masked_sum_of_decays():
    a = torch.tensor([-1.0, -2.0, float("-inf"), -0.5])
    seg = segsum(a)
    inf = float("-inf")
    expected = torch.tensor([[0.0, inf, inf, inf],
                             [-2.0, 0.0, inf, inf],
                             [inf, inf, 0.0, inf],
                             [inf, inf, -0.5, 0.0]])
    assert torch.equal(seg, expected)  # no NaN where an -inf is summed; -inf above the diagonal


def test_ssd_gradients_match_the_loop():
    inputs = list(ssd_inputs(t=21, seed=5))
    for v in inputs[:6]:
        v.requires_grad_(True)
    g = torch.Generator().manual_seed(6)
    wy = torch.randn(2, 21, 3, 4, generator=g, dtype=torch.float64)
    ws = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)

    def grads(fn):
        y, s = fn()
        return torch.autograd.grad((y * wy).sum() + (s * ws).sum(), inputs[:6])

    for a, b in zip(grads(lambda: ssd_chunked(*inputs[:5], 8, *inputs[5:])), grads(lambda: ssd_loop(*inputs))):
        assert torch.isfinite(a).all()
        close(a, b, 1e-10)


def test_gradients_reach_every_parameter():
    torch.manual_seed(7)
    m = make(chunk=8)
    x = torch.randn(2, 30, 16, requires_grad=True)
    resets = torch.zeros(2, 30, dtype=torch.bool)
    resets[:, [0, 13]] = True
    y, state = m(x, resets=resets, state=random_state(m, 2, seed=7))
    (y.pow(2).sum() + state["ssm"].pow(2).sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    assert torch.isfinite(x.grad).all()


def test_long_sequence_with_large_decays_is_stable():
    # T = 2048, dt up to 5 and -A up to 30: log-decays down to -150 per step and sums of -1e5 per chunk; one head
    # decays slowly (A = -0.01) and so remembers the whole sequence
    x, dt, A, B, C, h0, _ = ssd_inputs(b=1, t=2048, h=2, p=4, n=4, dtype=torch.float32, seed=8, dt_range=(0.5, 5.0))
    A = torch.tensor([-30.0, -0.01])
    resets = torch.zeros(1, 2048, dtype=torch.bool)
    dt.requires_grad_(True)
    y, s = ssd_chunked(x, dt, A, B, C, 64, h0, resets)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    (y.sum() + s.sum()).backward()
    assert torch.isfinite(dt.grad).all()
    with torch.no_grad():
        y_loop, s_loop = ssd_loop(x, dt, A, B, C, h0, resets)
    scale = y_loop.abs().max().item()
    close(y / scale, y_loop / scale, 1e-5)
    close(s / scale, s_loop / scale, 1e-5)


def test_module_in_float64_matches_step_tightly():
    torch.manual_seed(9)
    m = make(chunk=16, dim=32, head_dim=8, state_dim=8, dtype=torch.float64)
    x = torch.randn(2, 70, 32, dtype=torch.float64)  # 70: not a multiple of 16
    with torch.no_grad():
        y, state = m(x)
        y_ref, state_ref = loop(m, x)
    assert state["ssm"].dtype == torch.float64
    close(y, y_ref, 1e-10)
    close_state(state, state_ref, 1e-10)


def test_bfloat16_activations_keep_a_float32_scan():
    torch.manual_seed(10)
    m = make(chunk=8).to(torch.bfloat16)
    x = torch.randn(2, 20, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        y, state = m(x)
        y_ref, _ = loop(m, x)
    assert y.dtype == torch.bfloat16 and state["ssm"].dtype == torch.float32
    assert torch.isfinite(y.float()).all()
    close(y.float(), y_ref.float(), 0.1)  # bf16 rounding of the projections only


def test_init_ranges_seed_and_meta():
    cfg = ModelConfig(dim=32, recurrent=RecurrentConfig(head_dim=8, state_dim=4))
    m = build_mixer("mamba2", cfg, layer_id=1)
    assert isinstance(m, Mamba2) and m.n_heads == 8
    dt = F.softplus(m.dt_bias)
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 1e-1 * 1.001).all()
    assert (m.A_log.exp() >= 1).all() and (m.A_log.exp() <= 16).all()
    assert torch.equal(m.D, torch.ones(8)) and torch.equal(m.x_conv.bias, torch.zeros(m.inner))
    assert torch.equal(m.bc_conv.bias, torch.zeros(2 * m.state_dim))
    a, b = Mamba2(cfg), Mamba2(cfg)
    a.reset_parameters(0.1, 0.05, generator=torch.Generator().manual_seed(0))
    b.reset_parameters(0.1, 0.05, generator=torch.Generator().manual_seed(0))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert abs(a.out_proj.weight.std().item() - 0.05) < 0.01
    with torch.device("meta"):
        meta = Mamba2(cfg)
    meta.to_empty(device="cpu")
    meta.reset_parameters(0.1, 0.05)
    assert all(torch.isfinite(p).all() for p in meta.parameters())


def test_state_size_and_flops():
    cfg = ModelConfig(dim=32, recurrent=RecurrentConfig(expand=2, head_dim=8, state_dim=4, conv_width=4,
                                                        chunk_size=16))
    m = Mamba2(cfg)
    state = m.init_state(3)
    assert state["ssm"].shape == (3, 8, 8, 4) and state["conv"].shape == (3, 64 + 8, 3)
    assert m.num_state_elements() == sum(v[0].numel() for v in state.values()) == 8 * 8 * 4 + 72 * 3
    assert state_bytes(m) == 4 * m.num_state_elements()
    proj = 32 * (2 * 64 + 2 * 4 + 8) + 64 * 32
    scan = 2 * 16 * 4 + 2 * 64 * 16 + 4 * 64 * 4 + 2 * 64 * 4 // 16
    assert m.flops_per_token() == 2 * proj + 2 * 72 * 4 + scan


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="head_dim=12 must divide"):
        Mamba2(ModelConfig(dim=16, recurrent=RecurrentConfig(head_dim=12)))
    with pytest.raises(ValueError, match="conv_width=0"):
        Mamba2(ModelConfig(dim=16, recurrent=RecurrentConfig(head_dim=8, conv_width=0)))


def test_kernel_flag_keeps_the_plain_path_on_cpu():
    torch.manual_seed(11)
    m = make(chunk=8)
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        y, _ = m(x)
        m.use_kernels = True  # CUDA kernels only for CUDA tensors: a CPU tensor keeps the reference path
        y_flag, _ = m(x)
    assert torch.equal(y, y_flag)
