"""lm-evaluation-harness against the served adapter must score what lm-eval's own HF+PEFT backend
scores on the same adapter: its loglikelihood tasks read the echoed prompt's logprobs
(`echo`, `logprobs`, `max_tokens` 1), its chat client sends plain chat requests.

Nothing is downloaded: the tasks are local YAML files over local JSON data written here, the base is
the converted default model's HF directory, and the adapter is the session's `alpha`.

The loglikelihood tolerance is measured, not assumed: the same comparison on the plain base (served
vs HF, no adapter) gives the kernel noise between the two backends on this machine (packed oneDNN
weights and our attention vs stock HF; AVX-512/AMX and AVX2 machines differ), and the adapter run
may differ by a small multiple of it, plus a small floor for machines where that noise is ~0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from server.engine.model_loader import resolve_model_dir
from support.http import BASE

pytestmark = pytest.mark.real_model

NOISE_MULTIPLE = 4.0
# Added to the measured noise so that a machine where both backends happen to round alike (noise ~0)
# still tolerates the adapter path's own roundings: ~1,000 fp32 ulps of a logprob near -1.
ABS_FLOOR = 1e-4
COLORS = ["red", "blue", "green", "yellow"]
ANIMALS = ["cat", "dog", "horse", "cow"]


def _mc_questions() -> list[dict]:
    """30 four-way questions; what the answers are matters less than both backends agreeing."""
    docs = []
    for i in range(10):
        a, b = i + 2, (3 * i) % 7 + 1
        choices = [str(a + b), str(a + b + 1), str(a + b - 1), str(2 * (a + b))]
        docs.append({"question": f"What is {a} plus {b}?", "choices": choices, "answer": i % 4})
    for i, thing in enumerate(
        [
            "a ripe tomato",
            "the sky",
            "grass",
            "a banana",
            "blood",
            "the sea",
            "a leaf",
            "a lemon",
            "a fire truck",
            "a bluebird",
        ]
    ):
        docs.append({"question": f"What color is {thing}?", "choices": COLORS, "answer": i % 4})
    for i in range(10):
        docs.append(
            {
                "question": f"Which animal says {['meow', 'woof', 'neigh', 'moo'][i % 4]}?",
                "choices": ANIMALS,
                "answer": i % 4,
            }
        )
    return docs


GEN_QUESTIONS = [
    {"question": q, "answer": a}
    for q, a in [
        ("What is the capital of France? Answer in one word.", "Paris"),
        ("What is 2 plus 2? Answer with a number.", "4"),
        ("Name the color of grass in one word.", "Green"),
        ("What is the opposite of hot? One word.", "Cold"),
        ("What is the capital of Italy? Answer in one word.", "Rome"),
    ]
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, docs in (("mc", _mc_questions()), ("gen", GEN_QUESTIONS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "loraserve_mc.yaml").write_text(f"""\
task: loraserve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (root / "loraserve_gen.yaml").write_text(f"""\
task: loraserve_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
  temperature: 0.0
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "^\\\\s*(\\\\w+)"
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
""")
    return root


@pytest.fixture(scope="module")
def lm_eval(tasks, monkeypatch_module):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch_module.setenv(name, "1")
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(tasks / "datasets-cache"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    def evaluate(model: str, model_args: dict, task: str, **kwargs) -> dict:
        results = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=[task],
            task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
            **kwargs,
        )
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        return {"metrics": results["results"][task], "samples": samples}

    return evaluate


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def served(alpha_server):
    return alpha_server  # one server per settings profile (tests/conftest.py)


def _model_dir() -> str:
    return str(resolve_model_dir(None)[0])


def _served_args(served, model: str) -> dict:
    return dict(
        base_url=f"{served.url}/v1/completions",
        model=model,
        tokenizer=_model_dir(),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        batch_size=4,
        max_retries=1,
    )


def _hf_args(adapter: Path | None) -> dict:
    args = dict(pretrained=_model_dir(), dtype="float32", device="cpu", batch_size=8)
    return {**args, "peft": str(adapter)} if adapter else args


def _loglikelihoods(run: dict) -> list[float]:
    """Every (question, choice) loglikelihood, in document then choice order."""
    return [float(resp[0][0]) for s in run["samples"] for resp in s["resps"]]


def _max_spread(a: dict, b: dict) -> float:
    first, second = _loglikelihoods(a), _loglikelihoods(b)
    assert len(first) == len(second) == 120
    return max(abs(x - y) for x, y in zip(first, second))


def test_loglikelihoods_match_hf_peft_within_measured_noise(served, adapter_dirs, lm_eval):
    base_served = lm_eval("local-completions", _served_args(served, BASE), "loraserve_mc")
    base_hf = lm_eval("hf", _hf_args(None), "loraserve_mc")
    noise = _max_spread(base_served, base_hf)

    adapter_served = lm_eval("local-completions", _served_args(served, "alpha"), "loraserve_mc")
    adapter_hf = lm_eval("hf", _hf_args(adapter_dirs["alpha"]), "loraserve_mc")
    spread = _max_spread(adapter_served, adapter_hf)

    tolerance = NOISE_MULTIPLE * noise + ABS_FLOOR
    print(
        f"\nacc served/hf: base {base_served['metrics']['acc,none']}/{base_hf['metrics']['acc,none']}, "
        f"alpha {adapter_served['metrics']['acc,none']}/{adapter_hf['metrics']['acc,none']}; "
        f"max |dLL| base {noise:.2e}, alpha {spread:.2e}, tolerance {tolerance:.2e}"
    )
    assert spread <= tolerance
    assert adapter_served["metrics"]["acc,none"] == adapter_hf["metrics"]["acc,none"]
    assert base_served["metrics"]["acc,none"] == base_hf["metrics"]["acc,none"]
    base_lls, adapter_lls = _loglikelihoods(base_hf), _loglikelihoods(adapter_hf)
    assert max(abs(x - y) for x, y in zip(base_lls, adapter_lls)) > 100 * tolerance, (
        "the adapter must move the scores far more than the tolerance, or the test proves nothing"
    )
    assert all(math.isfinite(v) for v in _loglikelihoods(adapter_served))


def test_generate_until_through_local_chat_completions_matches_hf_peft(served, adapter_dirs, lm_eval):
    served_args = dict(
        base_url=f"{served.url}/v1/chat/completions", model="alpha", max_retries=1, tokenized_requests=False
    )
    chat = lm_eval("local-chat-completions", served_args, "loraserve_gen", apply_chat_template=True)
    hf = lm_eval("hf", _hf_args(adapter_dirs["alpha"]), "loraserve_gen", apply_chat_template=True)
    served_texts = [s["resps"][0][0] for s in chat["samples"]]
    hf_texts = [s["resps"][0][0] for s in hf["samples"]]
    print(
        f"\nexact_match served {chat['metrics']['exact_match,strip']} hf {hf['metrics']['exact_match,strip']}; "
        f"{served_texts} vs {hf_texts}"
    )
    assert len(served_texts) == len(GEN_QUESTIONS) and all(isinstance(t, str) for t in served_texts)
    assert served_texts == hf_texts
    assert chat["metrics"]["exact_match,strip"] == hf["metrics"]["exact_match,strip"]
