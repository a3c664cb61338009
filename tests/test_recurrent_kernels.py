"""Optional CUDA kernels of the recurrent mixers (model.recurrent.kernels; lmlab.models.recurrent.kernels_for).

The kernels (flash-linear-attention's fused_recurrent_hgrn, causal_conv1d's causal_conv1d_fn) need CUDA and Triton,
so on CPU the mixers' mapping onto each kernel's calling convention is tested with sequential implementations of that
convention written here from the kernels' documented semantics: the kernel path (log a -> g, resets -> g = -inf,
document numbers -> seq_idx, channel-last layout, the conv state after the last document) must give the plain path's
outputs, states and gradients. Where CUDA and the packages are present, the real kernels are compared too.
"""

import pytest
import torch
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.models import hawk, mamba2, mingru
from lmlab.models.recurrent import NO_KERNELS, Kernels, _import_kernels, build_mixer, kernels_for


def hgrn_convention(x, g, initial_state=None, output_final_state=False):
    """fused_recurrent_hgrn's contract: x, g (B, T, D); o_t = exp(g_t) o_{t-1} + x_t from initial_state (B, D)."""
    assert x.shape == g.shape and x.dim() == 3 and x.is_contiguous() and g.is_contiguous()
    assert initial_state is None or initial_state.shape == (x.shape[0], x.shape[2])
    h = torch.zeros_like(x[:, 0]) if initial_state is None else initial_state
    out = []
    for t in range(x.shape[1]):
        h = torch.exp(g[:, t]) * h + x[:, t]
        out.append(h)
    return torch.stack(out, 1), (h if output_final_state else None)


def conv_convention(x, weight, bias=None, seq_idx=None, activation=None):
    """causal_conv1d_fn's contract: x (B, C, T) (channel-last in memory when seq_idx is given), weight (C, W);
    an input reaches an output only within the same seq_idx; activation None or "silu"."""
    b, c, t = x.shape
    w = weight.shape[1]
    assert weight.shape == (c, w) and activation in (None, "silu")
    if seq_idx is not None:
        assert x.stride(1) == 1, "the kernel's seq_idx path needs channel-last memory"
        assert seq_idx.shape == (b, t) and seq_idx.dtype == torch.int32
    cols = []
    for i in range(t):
        y = torch.zeros(b, c, dtype=x.dtype)
        for j in range(w):
            s = i - (w - 1) + j
            if s < 0:
                continue
            keep = torch.ones(b, 1, dtype=x.dtype) if seq_idx is None else (seq_idx[:, s] == seq_idx[:, i])[:, None]
            y = y + keep.to(x.dtype) * x[:, :, s] * weight[:, j]
        cols.append(y)
    y = torch.stack(cols, 2)
    if bias is not None:
        y = y + bias[:, None]
    return F.silu(y) if activation == "silu" else y


REFERENCE = Kernels(scan=hgrn_convention, conv=conv_convention)


def mixer(name, kernels=True, conv_width=4):
    cfg = ModelConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, multiple_of=8, mixer=name)
    cfg.recurrent.head_dim, cfg.recurrent.state_dim, cfg.recurrent.chunk_size = 8, 4, 8
    cfg.recurrent.conv_width, cfg.recurrent.kernels = conv_width, kernels
    torch.manual_seed(3)
    m = build_mixer(name, cfg, 0).double()
    with torch.no_grad():  # livelier gates than the init's, so that decays and resets matter
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def patch(monkeypatch, kernels):
    for module in (hawk, mingru, mamba2):
        monkeypatch.setattr(module, "kernels_for", lambda x, enabled: kernels if enabled else NO_KERNELS)


def run(m, x, resets, state):
    y, new = m(x, resets=resets, state=state)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
    grads = torch.autograd.grad(loss, [x, *m.parameters()])
    return y, new, grads


# (mixer, case): packed rows with resets (scan + conv kernels), continuing from a state (scan kernel with an initial
# state; the conv kernel does not take one), no convolution (Mamba2 always has one)
CASES = [(n, c) for n in ["hawk", "mingru", "minlstm", "mamba2"] for c in ["resets", "state", "no_conv"]
         if (n, c) != ("mamba2", "no_conv")]


@pytest.mark.parametrize("name,case", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_kernel_path_equals_plain_path(monkeypatch, name, case):
    m = mixer(name, conv_width=0 if case == "no_conv" else 4)
    torch.manual_seed(4)
    x = torch.randn(3, 13, 16, dtype=torch.float64, requires_grad=True)
    resets = torch.zeros(3, 13, dtype=torch.bool)
    resets[:, 0] = True
    resets[0, 5] = resets[1, 11] = resets[2, 12] = True  # the last ones inside the conv state's window
    state = None
    if case == "state":  # continuing sequences: the scan kernel with an initial state, the conv on the plain path
        # a state some earlier tokens left (positive: minGRU / minLSTM states are, their log scan relies on it)
        state = {k: torch.rand_like(v) + 0.1 for k, v in m.init_state(3, dtype=torch.float64).items()}
        resets[:, 0] = False
    m.use_kernels = False
    y0, s0, g0 = run(m, x, resets, state)
    calls = []

    def counted(fn, label):
        def wrapped(*a, **kw):
            calls.append(label)
            return fn(*a, **kw)
        return wrapped

    patch(monkeypatch, Kernels(scan=counted(hgrn_convention, "scan"), conv=counted(conv_convention, "conv")))
    m.use_kernels = True
    y1, s1, g1 = run(m, x, resets, state)
    expected = ({"scan"} if name != "mamba2" else set()) | ({"conv"} if case == "resets" else set())
    assert set(calls) == expected  # the kernels ran where they apply, and only there
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    assert s1.keys() == s0.keys()
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_kernels_only_for_cuda_tensors_when_enabled():
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    assert kernels_for(x, True) == NO_KERNELS
    assert kernels_for(x, False) == NO_KERNELS
    m = mixer("hawk")
    with torch.no_grad():
        y_flag, _ = m(x)
        m.use_kernels = False
        y_plain, _ = m(x)
    assert torch.equal(y_flag, y_plain)  # on CPU the flag changes nothing


@pytest.mark.skipif(not torch.cuda.is_available() or _import_kernels().scan is None,
                    reason="needs CUDA and flash-linear-attention (causal_conv1d optional)")
@pytest.mark.parametrize("name", ["hawk", "mingru", "minlstm"])
def test_real_kernels_equal_plain_path_on_cuda(name):
    m = mixer(name).float().cuda()
    x = torch.randn(4, 200, 16, device="cuda", requires_grad=True)
    resets = torch.zeros(4, 200, dtype=torch.bool, device="cuda")
    resets[:, 0] = resets[1, 77] = resets[3, 150] = True
    m.use_kernels = False
    y0, s0, g0 = run(m, x, resets, None)
    m.use_kernels = True
    y1, s1, g1 = run(m, x, resets, None)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-4, atol=1e-4)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
