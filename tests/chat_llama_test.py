"""The built-in Llama forward (services/chat/llama.py) against transformers'
own LlamaForCausalLM on the same cached weights, and the import diet it exists for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from services.chat import llama
from services.chat.config import ChatSettings
from services.chat.engine import PACKED_FILE, ChatModel, resolve_dtype
from tests.processes import REPO

QUESTIONS = [
    "What is the capital of France?",
    "Write a long story about a lighthouse keeper.",
    "法国的首都是哪里？",
]


@pytest.fixture(scope="module")
def chat_model() -> ChatModel:
    """bfloat16 all through, as transformers computes it (packed decode is tested apart)."""
    model = ChatModel(ChatSettings(packed_decode=False))
    model.load()
    return model


@pytest.fixture(scope="module")
def reference(chat_model: ChatModel):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    assert chat_model.folder is not None
    dtype = getattr(torch, chat_model.dtype_name)
    return AutoModelForCausalLM.from_pretrained(chat_model.folder, dtype=dtype).eval()


def test_default_model_runs_on_the_builtin_llama(chat_model: ChatModel) -> None:
    assert chat_model.implementation == "builtin-llama"
    assert isinstance(chat_model.model, llama.LlamaForCausalLM)


@pytest.mark.parametrize("question", QUESTIONS)
def test_builtin_llama_gives_transformers_logits_and_text(
    chat_model: ChatModel, reference, question: str
) -> None:
    from transformers import DynamicCache

    ids = chat_model.prompt_ids([{"role": "user", "content": question}])
    with torch.inference_mode():
        ours = chat_model.model(input_ids=torch.tensor([ids])).logits.float()
        theirs = reference(input_ids=torch.tensor([ids])).logits.float()
        assert torch.allclose(ours, theirs, atol=0.05, rtol=0)

        def greedy(model, cache) -> list[int]:  # type: ignore[no-untyped-def]
            output = model(input_ids=torch.tensor([ids]), cache=cache, logits_to_keep=1)
            tokens: list[int] = []
            for _ in range(32):
                tokens.append(int(output.logits[0, -1].float().argmax()))
                output = model(input_ids=torch.tensor([tokens[-1:]]), cache=output.cache)
            return tokens

        assert greedy(chat_model.model, llama.KVCache()) == greedy(
            reference, DynamicCache(config=reference.config)
        )


@pytest.mark.skipif(
    resolve_dtype("auto") != "bfloat16", reason="packed decode runs with bfloat16 weights only"
)
def test_packed_decode_gives_the_bf16_models_tokens(chat_model: ChatModel) -> None:
    """The 4-bit copies hold the same values as the dequantised GGUF weights:
    token by token (teacher-forced), the same next token and near-equal logits."""
    packed = ChatModel(ChatSettings())
    packed.load()
    # Every projection of the Q4_1 model but lm_head (tied to the embedding, not 4-bit).
    assert packed.packed_projections == 7 * 30
    assert llama.pack_4bit(torch.randn(64, 64, dtype=torch.bfloat16)) is None
    # Kept beside the cached weights, so a restart reads them instead of packing again.
    assert packed.folder is not None and (packed.folder / PACKED_FILE).is_file()
    again = ChatModel(ChatSettings())
    again.load()
    assert again.packed_projections == packed.packed_projections
    first = packed.model.packed_state()
    for name, tensor in again.model.packed_state().items():
        assert torch.equal(tensor, first[name]), name
    agreed = steps = 0
    worst = 0.0
    with torch.inference_mode():
        for question in QUESTIONS:
            ids = chat_model.prompt_ids([{"role": "user", "content": question}])
            ours = chat_model.model(input_ids=torch.tensor([ids]), logits_to_keep=1)
            theirs = packed.model(input_ids=torch.tensor([ids]), logits_to_keep=1)
            for _ in range(32):
                want = int(ours.logits[0, -1].float().argmax())
                got = theirs.logits[0, -1].float()
                agreed += int(got.argmax()) == want
                worst = max(worst, float((got - ours.logits[0, -1].float()).abs().max()))
                steps += 1
                step = torch.tensor([[want]])
                ours = chat_model.model(input_ids=step, cache=ours.cache)
                theirs = packed.model(input_ids=step, cache=theirs.cache)
    print(f"packed decode: {agreed}/{steps} same tokens, largest logit difference {worst:.3f}")
    assert agreed / steps >= 0.97, (agreed, steps)
    # Logits of ~20-30 in bfloat16 are 0.125-0.25 apart; summing in another order
    # moves them a few such steps (the cropped-cache test allows 1.0 for the same).
    assert worst < 2.0, worst


def test_cropped_cache_continues_like_a_full_prefill(chat_model: ChatModel) -> None:
    ids = chat_model.prompt_ids([{"role": "user", "content": QUESTIONS[0]}])
    with torch.inference_mode():
        full = chat_model.model(input_ids=torch.tensor([ids])).logits.float()[0]
        cache = chat_model.model(input_ids=torch.tensor([ids])).cache
        cache.crop(-4)
        assert cache.get_seq_length() == len(ids) - 4
        tail = chat_model.model(input_ids=torch.tensor([ids[-4:]]), cache=cache).logits.float()[0]
    assert cache.get_seq_length() == len(ids)
    assert torch.equal(tail.argmax(-1), full[-4:].argmax(-1))
    assert torch.allclose(tail, full[-4:], atol=1.0, rtol=0)  # bf16 rounding, not masking


def test_restart_from_cache_skips_transformers_modeling_imports(chat_model: ChatModel) -> None:
    """What keeps a restart under 3 s: loading from the cache never imports
    transformers' modeling stack (torch._dynamo, sympy, scipy come with it)."""
    script = (
        "import json, sys\n"
        "from services.chat.config import ChatSettings\n"
        "from services.chat.engine import PACKED_FILE, ChatModel, resolve_dtype\n"
        "model = ChatModel(ChatSettings())\n"
        "model.load()\n"
        "heavy = ['transformers.modeling_utils', 'torch._dynamo', 'sympy', 'scipy']\n"
        "print(json.dumps([model.loaded_from, [m for m in heavy if m in sys.modules]]))\n"
    )
    env = {**os.environ, "TALKER_CACHE_DIR": str(chat_model.settings.cache_dir)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded_from, heavy = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded_from == "cache"
    assert heavy == []
