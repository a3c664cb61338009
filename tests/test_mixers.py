"""minGRU, minLSTM and Hawk mixers and their parallel scans (lmlab.models.scan), each against a slow reference:
the scans against a Python loop of the recurrence, the mixers' parallel forward against their own ``step`` in a loop
(outputs, final state and gradients), packed rows against each document alone, and continuation from a state."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig, RecurrentConfig
from lmlab.models.hawk import Hawk, _SqrtBoundedGrad
from lmlab.models.layers import RMSNorm
from lmlab.models.mingru import MinGRU
from lmlab.models.minlstm import MinLSTM
from lmlab.models.recurrent import doc_resets
from lmlab.models.scan import linear_scan, log_scan

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = {"mingru": MinGRU, "minlstm": MinLSTM, "hawk": Hawk}
# (mixer, conv_width): minGRU / minLSTM with and without their optional convolution, Hawk with its own
VARIANTS = [("mingru", 0), ("mingru", 4), ("minlstm", 0), ("minlstm", 3), ("hawk", 4), ("hawk", 0)]
ELEMENTWISE = {"mingru": 6, "minlstm": 9, "hawk": 16}  # per inner channel, as the flops_per_token docstrings say


def ref_scan(a, b, h0=None, resets=None):
    """The recurrence h_t = a_t h_{t-1} + b_t, one step at a time."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(a.shape[1]):
        keep = a[:, t] if resets is None else torch.where(resets[:, t, None], torch.zeros_like(a[:, t]), a[:, t])
        h = keep * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def make_mixer(name, conv_width=4, dim=16, seed=0, dtype=torch.float32):
    """A mixer with random weights large enough that every gate and bias matters."""
    cfg = ModelConfig(dim=dim, n_heads=2, recurrent=RecurrentConfig(expand=2, conv_width=conv_width, head_dim=8))
    torch.manual_seed(seed)
    mixer = CLASSES[name](cfg, layer_id=0)
    gen = torch.Generator().manual_seed(seed)
    mixer.reset_parameters(in_std=0.4, out_std=0.3, generator=gen)
    with torch.no_grad():
        for pname, p in mixer.named_parameters():
            if pname in ("b_a", "b_x", "conv.bias"):
                p.normal_(0.0, 0.5, generator=gen)
    return mixer.to(dtype)


def random_state(mixer, batch, dtype=torch.float32, seed=1):
    """A nonzero state as a previous forward could leave it (minGRU / minLSTM states are positive)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in mixer.init_state(batch, "cpu").items()}
    if not isinstance(mixer, Hawk):
        state["h"] = state["h"].abs() + 0.1
    return state


def step_loop(mixer, x, state):
    ys = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def assert_states_close(s1, s2, **tol):
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], **tol, msg=lambda m, k=k: f"state[{k!r}]: {m}")


# ---------------------------------------------------------------- scans


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("with_resets", [False, True])
def test_linear_scan_matches_loop(with_h0, with_resets):
    g = torch.Generator().manual_seed(0)
    bsz, t, c = 3, 37, 5
    a = torch.rand(bsz, t, c, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(bsz, t, c, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(bsz, c, generator=g, dtype=torch.float64).requires_grad_() if with_h0 else None
    resets = (torch.rand(bsz, t, generator=g) < 0.15) if with_resets else None
    w = torch.randn(bsz, t, c, generator=g, dtype=torch.float64)
    inputs = [a, b] + ([h0] if with_h0 else [])
    h = linear_scan(a, b, h0, resets)
    ref = ref_scan(a, b, h0, resets)
    torch.testing.assert_close(h, ref, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad((h * w).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * w).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert linear_scan(a.float(), b.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("with_resets", [False, True])
def test_log_scan_matches_loop(with_h0, with_resets):
    g = torch.Generator().manual_seed(1)
    bsz, t, c = 3, 37, 5
    log_a = torch.rand(bsz, t, c, generator=g, dtype=torch.float64).log().requires_grad_()
    log_b = (2 * torch.randn(bsz, t, c, generator=g, dtype=torch.float64)).requires_grad_()
    h0 = torch.rand(bsz, c, generator=g, dtype=torch.float64).requires_grad_() if with_h0 else None
    resets = (torch.rand(bsz, t, generator=g) < 0.15) if with_resets else None
    w = torch.randn(bsz, t, c, generator=g, dtype=torch.float64)
    inputs = [log_a, log_b] + ([h0] if with_h0 else [])
    log_h = log_scan(log_a, log_b, h0, resets)
    ref = ref_scan(log_a.exp(), log_b.exp(), h0, resets).log()
    torch.testing.assert_close(log_h, ref, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad((log_h * w).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * w).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    # a zero initial state is the same as none, and its gradient is finite
    zero = torch.zeros(bsz, c, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(log_scan(log_a, log_b, zero, resets), log_scan(log_a, log_b, None, resets))
    (grad_zero,) = torch.autograd.grad((log_scan(log_a, log_b, zero, resets) * w).sum(), [zero])
    assert torch.isfinite(grad_zero).all()


def test_scans_gradcheck():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 6, 3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(2, 6, 3, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.rand(2, 3, generator=g, dtype=torch.float64).requires_grad_()
    resets = torch.tensor([[False, False, True, False, False, False], [False] * 5 + [True]])
    assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a, b, h0, resets), (a, b, h0))
    assert torch.autograd.gradcheck(lambda la, lb, h0: log_scan(la, lb, h0, resets), (a.log(), b, h0))


def test_scans_long_sequences_float32():
    """T = 4096 in float32 with strong decay (log a down to -12) and long memory (a near 1) against a float64
    loop: the doubling scans stay at rounding level (Heinsen's cumsum form is off by ~2e-3 here)."""
    g = torch.Generator().manual_seed(3)
    bsz, t, c = 2, 4096, 8
    log_a = torch.empty(bsz, t, c, dtype=torch.float64)
    log_a[..., :4] = -2 - 10 * torch.rand(bsz, t, 4, generator=g, dtype=torch.float64)  # strong decay
    log_a[..., 4:] = -1e-3 * torch.rand(bsz, t, 4, generator=g, dtype=torch.float64)  # memory ~ 2000 steps
    log_b = torch.randn(bsz, t, c, generator=g, dtype=torch.float64)
    resets = torch.zeros(bsz, t, dtype=torch.bool)
    resets[0, 3000] = True
    ref = ref_scan(log_a.exp(), log_b.exp(), None, resets)
    got = log_scan(log_a.float(), log_b.float(), None, resets).exp()
    assert torch.isfinite(got).all()
    assert ((got.double() - ref).abs() / ref).max() < 1e-5
    b = torch.randn(bsz, t, c, generator=g, dtype=torch.float64)
    ref = ref_scan(log_a.exp(), b, None, resets)
    got = linear_scan(log_a.exp().float(), b.float(), None, resets)
    assert torch.isfinite(got).all()
    scale = ref.abs().amax(dim=1, keepdim=True)  # per channel: long memory sums ~2000 inputs
    assert ((got.double() - ref).abs() / scale).max() < 1e-5


# ---------------------------------------------------------------- mixers


@pytest.mark.parametrize("name,conv_width", VARIANTS)
def test_forward_matches_step_loop(name, conv_width):
    mixer = make_mixer(name, conv_width)
    x = torch.randn(2, 23, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, state = mixer(x)
        y_ref, state_ref = step_loop(mixer, x, mixer.init_state(2, "cpu", torch.float32))
        assert y.dtype == torch.float32 and y.shape == x.shape
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        assert_states_close(state, state_ref, atol=1e-5, rtol=1e-5)
        # from a nonzero state too
        s0 = random_state(mixer, 2)
        y, state = mixer(x, state=s0)
        y_ref, state_ref = step_loop(mixer, x, s0)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        assert_states_close(state, state_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,conv_width", VARIANTS)
def test_packed_rows_equal_documents_alone(name, conv_width):
    mixer = make_mixer(name, conv_width)
    lengths = [[5, 9, 7], [10, 9, 2]]  # the last document of row 1 is shorter than the convolution's window
    x = torch.randn(2, 21, 16, generator=torch.Generator().manual_seed(1))
    doc_ids = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lengths])
    with torch.no_grad():
        y, state = mixer(x, resets=doc_resets(doc_ids))
        for r, row in enumerate(lengths):
            start = 0
            for n in row:
                y_doc, state_doc = mixer(x[r:r + 1, start:start + n])
                torch.testing.assert_close(y[r:r + 1, start:start + n], y_doc, atol=1e-5, rtol=1e-5)
                start += n
            assert_states_close({k: v[r:r + 1] for k, v in state.items()}, state_doc, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,conv_width", VARIANTS)
def test_continuation(name, conv_width):
    """forward(x[:, :k]) then forward(x[:, k:], state) == forward(x); and a packed row whose first document
    continues a state (no reset at t = 0) == that document continued alone."""
    mixer = make_mixer(name, conv_width)
    x = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, state = mixer(x)
        for k in (1, 2, 13):  # shorter than the convolution's window, and longer
            y1, s1 = mixer(x[:, :k])
            y2, s2 = mixer(x[:, k:], state=s1)
            torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, atol=1e-5, rtol=1e-5)
            assert_states_close(s2, state, atol=1e-5, rtol=1e-5)
        s0 = random_state(mixer, 2)
        resets = torch.zeros(2, 20, dtype=torch.bool)
        resets[:, 8] = True
        y, state = mixer(x, resets=resets, state=s0)
        y_first, _ = mixer(x[:, :8], state=s0)
        y_second, s_second = mixer(x[:, 8:])
        torch.testing.assert_close(y, torch.cat([y_first, y_second], dim=1), atol=1e-5, rtol=1e-5)
        assert_states_close(state, s_second, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,conv_width", VARIANTS)
def test_gradients_match_step_loop(name, conv_width):
    """float64: the parallel path's gradients (parameters, input, initial state) equal those through the step loop,
    with a reset in one row; every parameter gets a finite nonzero gradient."""
    mixer = make_mixer(name, conv_width, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 16, generator=g, dtype=torch.float64)
    w = torch.randn(2, 12, 16, generator=g, dtype=torch.float64)
    resets = torch.zeros(2, 12, dtype=torch.bool)
    resets[1, 5] = True

    def grads(parallel):
        s0 = {k: v.requires_grad_() for k, v in random_state(mixer, 2, torch.float64).items()}
        xr = x.clone().requires_grad_()
        if parallel:
            y, state = mixer(xr, resets=resets, state=s0)
        else:  # the step loop with the reset: the state (and convolution window) of row 1 zeroed before token 5
            ys, state = [], s0
            for t in range(12):
                state = {k: v * (~resets[:, t]).to(v.dtype).view(-1, *[1] * (v.dim() - 1)) for k, v in state.items()}
                yt, state = mixer.step(xr[:, t], state)
                ys.append(yt)
            y = torch.stack(ys, dim=1)
        loss = (y * w).sum() + sum(v.square().sum() for v in state.values())
        inputs = [xr, *s0.values(), *mixer.parameters()]
        return torch.autograd.grad(loss, inputs)

    got, want = grads(True), grads(False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for (pname, _), gp in zip(mixer.named_parameters(), got[-len(list(mixer.parameters())):]):
        assert torch.isfinite(gp).all() and gp.abs().sum() > 0, pname


@pytest.mark.parametrize("name,conv_width", [("mingru", 4), ("minlstm", 0), ("hawk", 4)])
def test_long_sequence_strong_decay_and_long_memory(name, conv_width):
    """T = 4096 in float32, gates pushed to both extremes (a_t ~ 0 and a_t ~ 1): finite, equal to the step loop."""
    mixer = make_mixer(name, conv_width, dim=8)
    with torch.no_grad():
        if isinstance(mixer, Hawk):  # Lambda: half the channels a ~ e^-80 (c r_t ~ 4), half 1 - 1e-7
            mixer.a_param[: mixer.inner // 2] = -20.0
            mixer.a_param[mixer.inner // 2:] = 16.0
        else:  # large gate weights: z, f' ~ 0 or 1 (log a down to ~ -20) depending on the token
            for lin in (getattr(mixer, "w_z", None), getattr(mixer, "w_f", None), getattr(mixer, "w_i", None)):
                if lin is not None:
                    lin.weight.mul_(8.0)
        x = torch.randn(1, 4096, 8, generator=torch.Generator().manual_seed(4))
        y, state = mixer(x)
        y_ref, state_ref = step_loop(mixer, x, mixer.init_state(1, "cpu", torch.float32))
    assert torch.isfinite(y).all() and all(torch.isfinite(v).all() for v in state.values())
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)
    assert_states_close(state, state_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name,conv_width", VARIANTS)
def test_bf16_state_size_flops_and_meta(name, conv_width):
    mixer = make_mixer(name, conv_width)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(5))
    # bf16 weights and input: float32 inside, bf16 out, close to the float32 mixer; a float32 state stays float32
    m16 = make_mixer(name, conv_width, dtype=torch.bfloat16)
    with torch.no_grad():
        y16, s16 = m16(x.bfloat16(), state=m16.init_state(2, "cpu", torch.float32))
        y, _ = mixer(x)
    assert y16.dtype == torch.bfloat16 and all(v.dtype == torch.float32 for v in s16.values())
    torch.testing.assert_close(y16.float(), y, atol=0.1, rtol=0.1)
    # the state's size, and FLOPs = 2 x matrix weights (linear, block-diagonal, convolution) + elementwise work
    state = mixer.init_state(1, "cpu")
    assert mixer.num_state_elements() == sum(v.numel() for v in state.values())
    matrices = sum(p.numel() for p in mixer.parameters() if p.dim() >= 2)
    assert mixer.flops_per_token() == 2 * matrices + ELEMENTWISE[name] * mixer.inner
    # built on the meta device, then materialised: reset_parameters gives every weight its value
    cfg = ModelConfig(dim=16, n_heads=2, recurrent=RecurrentConfig(expand=2, conv_width=conv_width, head_dim=8))
    with torch.device("meta"):
        meta = CLASSES[name](cfg, 0)
    meta.to_empty(device="cpu")
    meta.reset_parameters(0.1, 0.1, torch.Generator().manual_seed(0))
    plain = CLASSES[name](cfg, 0)
    plain.reset_parameters(0.1, 0.1, torch.Generator().manual_seed(0))
    for (pname, p), q in zip(meta.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), pname


def test_hawk_step_is_the_rg_lru():
    """Hawk's step (which shares its gate code with the forward) against the paper's formulas written out here:
    dense block-diagonal gates, a_t = sigmoid(Lambda)^(8 r_t), h_t = a_t h + sqrt(1 - a_t^2) (i_t u_t); values and
    gradients."""
    mixer = make_mixer("hawk", 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 16, generator=g, dtype=torch.float64)
    state = random_state(mixer, 3, torch.float64)
    y, new = mixer.step(x, state)
    window = torch.cat([state["conv"], mixer.w_in(x).unsqueeze(-1)], dim=-1)
    u = (window * mixer.conv.weight).sum(-1) + mixer.conv.bias
    r = torch.sigmoid(u @ torch.block_diag(*mixer.w_a) + mixer.b_a)
    i = torch.sigmoid(u @ torch.block_diag(*mixer.w_x) + mixer.b_x)
    a = torch.sigmoid(mixer.a_param) ** (8 * r)
    h = a * state["h"] + torch.sqrt(1 - a**2) * i * u
    y_ref = mixer.w_out(F.gelu(mixer.w_gate(x), approximate="tanh") * h)
    torch.testing.assert_close(new["h"], h, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(new["conv"], window[..., 1:], atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    inputs = [x, *mixer.parameters()]
    got = torch.autograd.grad((y * w).sum() + new["h"].sum(), inputs)
    want = torch.autograd.grad((y_ref * w).sum() + h.sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_hawk_init_and_head_dim_check():
    mixer = make_mixer("hawk", 4, dim=32)
    a_c = torch.exp(-8.0 * F.softplus(-mixer.a_param.detach()))  # a^c
    assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6 and a_c.std() > 0.02
    # sqrt(1 - a^2): the exact value, with its slope capped at 1000 where a -> 1
    x = torch.tensor([0.0, 1e-9, 0.25], requires_grad=True)
    y = _SqrtBoundedGrad.apply(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y.detach(), x.detach().sqrt())
    torch.testing.assert_close(grad, torch.tensor([1000.0, 1000.0, 1.0]))
    with pytest.raises(ValueError, match="head_dim"):
        Hawk(ModelConfig(dim=12, n_heads=2, recurrent=RecurrentConfig(expand=1, head_dim=8)), 0)


class TinyStack(nn.Module):
    """Embedding, two pre-norm residual mixer blocks, norm, head."""

    def __init__(self, name, vocab=8, dim=32):
        super().__init__()
        cfg = ModelConfig(dim=dim, n_heads=2, recurrent=RecurrentConfig(expand=2, conv_width=0, head_dim=16))
        self.emb = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in range(2))
        self.mixers = nn.ModuleList(CLASSES[name](cfg, i) for i in range(2))
        for m in self.mixers:
            m.reset_parameters(in_std=dim**-0.5, out_std=dim**-0.5)
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.emb(tokens)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))[0]
        return self.head(self.norm(x))


@pytest.mark.parametrize("name", list(CLASSES))
def test_two_layer_stack_learns_to_copy_previous_token(name):
    """A smoke test of training: predicting the previous token needs the recurrence (no convolution here)."""
    torch.manual_seed(0)
    model = TinyStack(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        tokens = torch.randint(0, 8, (16, 24))
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, 1:].reshape(-1, 8), tokens[:, :-1].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
