"""The CUDA paths, each checked against its CPU or slow reference (skipped without a GPU).

These run where a GPU is present (a lent GPU machine, a user's box); CI has none. What they cover: the model's
forward and gradients on CUDA against the same weights on CPU (attention with smeared keys, every recurrent mixer's
parallel scan), the engine's greedy decoding on CUDA against the full-recompute reference (ragged prompts; a tool,
stop strings, preemption and the prefix cache; a recurrent hybrid), and the trainer on CUDA (bf16 autocast by
default, fused AdamW, MFU from the device table, a resume that continues the same run).
"""

from __future__ import annotations

import pytest
import torch
from reference import generate_reference
from test_engine import EchoTool, check_pool_is_whole, prompts_of, small_model, two_turns_equal_the_reference
from test_engine_recurrent import model_of
from test_recurrent import MIXERS, tiny
from test_train import corpus, losses, make_cfg  # noqa: F401  (corpus: a fixture)

from lmlab.inference import Engine, Request, SamplingParams
from lmlab.models import build_model
from lmlab.monitor.metrics import read_metrics
from lmlab.tokenizers import ByteTokenizer, DialogTokenizer
from lmlab.train import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 matmuls in full precision (no TF32), so that CUDA and CPU results compare at float32 tolerances."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def forward_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()
    return logits.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


def assert_cuda_matches_cpu(model, vocab, atol=2e-4):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, vocab, (3, 48), generator=g), torch.randint(0, vocab, (3, 48), generator=g)
    ref_logits, ref_grads = forward_and_grads(model.train(), x, y)
    model.to(CUDA)
    logits, grads = forward_and_grads(model, x.to(CUDA), y.to(CUDA))
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=1e-3,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_llama_with_smeared_keys_forward_and_gradients_on_cuda_match_cpu():
    assert_cuda_matches_cpu(small_model(smear_keys=3, smear_queries=True), 97)


@pytest.mark.parametrize("mixer", MIXERS)
def test_recurrent_mixers_forward_and_gradients_on_cuda_match_cpu(mixer):
    assert_cuda_matches_cpu(build_model(tiny(mixer=mixer), seed=0), 40)


GREEDY = SamplingParams(max_new_tokens=16, temperature=0)


@pytest.mark.parametrize("make", [lambda: small_model(smear_keys=3), lambda: model_of(["mamba2", "attention"])],
                         ids=["llama_smear", "mamba2+attention"])
def test_engine_greedy_on_cuda_equals_the_full_recompute_reference(make):
    model = make().to(CUDA)
    prompts = prompts_of([1, 40, 7, 23, 2, 31, 12, 40, 5, 17, 3, 9])
    engine = Engine(model, pool_tokens=512, page_size=8, max_batch=5)  # fewer rows than prompts: the batch turns over
    got = [r.tokens for r in engine.generate([Request(prompt=p, params=GREEDY) for p in prompts])]
    assert got == generate_reference(model, prompts, GREEDY)
    if engine.pool.kv_layers:
        assert engine.pool.k.device.type == CUDA.type


def test_engine_with_a_tool_stop_strings_preemption_and_prefix_cache_on_cuda_equals_the_reference():
    dtok = DialogTokenizer(ByteTokenizer())
    tok = dtok.tokenizer
    model = small_model(vocab_size=tok.vocab_size, seed=5, max_seq_len=256)
    with torch.no_grad():  # the model emits the tool's trigger where it would have written 'u' (as in test_engine)
        w = model.output.weight
        trig = tok.special_id(EchoTool.trigger)
        w[[ord("u"), trig]] = w[[trig, ord("u")]]
    model.to(CUDA)
    engine = Engine(model, dtok, pool_tokens=320, page_size=8, max_batch=6, tools=[EchoTool()])
    questions = ["How old is Ada?", "Where does Bob live?", "Hi", "What does Carol do?", "Who is Dan?", "Eve?"]
    res1, res2 = two_turns_equal_the_reference(model, dtok, engine, EchoTool(), questions)
    assert sum(len(r.tool_calls) for r in res1 + res2) >= 3 and engine.stats["preemptions"] > 0
    check_pool_is_whole(engine)


def test_trainer_on_cuda_uses_bf16_fused_adamw_reports_mfu_and_resumes(tmp_path, corpus):  # noqa: F811
    cuda = ["train.device=cuda", "train.steps=16"]
    straight = make_cfg(tmp_path, corpus, *cuda, name="straight")
    trainer = Trainer(straight)
    assert trainer.device.type == "cuda"
    assert all(g.get("fused") for g in trainer.optimizer.param_groups)  # fused AdamW on CUDA
    trainer.fit()
    rows = [r for r in read_metrics(straight.run_dir / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # it learns
    assert rows[-1]["mfu"] > 0 and rows[-1]["time/forward_ms"] > 0  # the device table names this GPU; CUDA timers
    split = make_cfg(tmp_path, corpus, *cuda, name="split")
    assert Trainer(split).fit(stop_after=6)["step"] == 6
    assert Trainer(split).fit()["resumed"]
    a, b = losses(straight.run_dir), losses(split.run_dir)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 17))
    # the same run continued: equal up to the GPU's non-deterministic reductions (atomics in attention backward)
    torch.testing.assert_close([x for _, x in b], [x for _, x in a], atol=2e-3, rtol=2e-3)


def test_bf16_autocast_on_cuda_trains_like_float32(tmp_path, corpus):  # noqa: F811
    runs = {}
    for dtype in ("bfloat16", "float32"):
        cfg = make_cfg(tmp_path, corpus, "train.device=cuda", f"train.dtype={dtype}", "train.steps=30", name=dtype)
        Trainer(cfg).fit()
        runs[dtype] = [x for _, x in losses(cfg.run_dir)]
    assert runs["bfloat16"][-1] < runs["bfloat16"][0] - 0.5
    assert abs(runs["bfloat16"][-1] - runs["float32"][-1]) < 0.1 * runs["float32"][-1]
