"""The vLLM plugin against the real vLLM 0.33 package (run in .venv-vllm by .ci/vllm.sh).

No engine runs here (no GPU); vLLM's own classes do, on the CPU:
- the processor is built by vLLM's loaders (entry point, import path) for both model runners and
  driven through each interface: the V2 runner's ``add_request`` / ``apply_staged_writes`` /
  ``apply(logits, LogitsContext)`` over a real ``RequestState`` (slot recycling, chunked
  prefill, preemption, batch-sharded tensor parallelism), and the legacy runner's
  ``update_state(BatchUpdate)`` / ``apply(logits)`` with ``BatchUpdate``s built by vLLM's
  ``BatchUpdateBuilder`` (adds, removes, condensing moves, swaps); every step is compared with
  a plain-Python model (decoded text + ``re`` + the PVC rules written out);
- TVC settings go through vLLM's admission path (``InputProcessor.process_inputs``, the params
  validators of both runners);
- the PVC driver's prompts go through vLLM's own Qwen2-VL input processing
  (``InputProcessor``), which expands the image placeholders.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    # vLLM's CPU platform: lets the engine configuration and the V2 runner's buffers be built
    # on a machine without a GPU.
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; its tests run in .venv-vllm (.ci/vllm.sh)")

from conftest import asset  # noqa: E402
from tvc_reference import ExpectedStream  # noqa: E402

import tvc_rs  # noqa: E402
from tvc_rs.pvc import PVCConfig  # noqa: E402
from tvc_rs.vllm import (  # noqa: E402
    DEFAULT_CALIBRATION_TOKEN_ID,
    TVCLogitsProcessor,
    TVCRequest,
    TVCSettings,
    _Driver,
    _Session,
    tvc_sampling_params,
)
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.v1.sample.logits_processor import (  # noqa: E402
    BatchUpdateBuilder,
    LogitsProcessors,
    MoveDirectionality,
    build_logitsprocs,
    validate_logits_processors_parameters,
)
from vllm.v1.worker.gpu.sample.logits_processor import (  # noqa: E402
    LogitsContext,
    build_custom_logits_processors,
    build_custom_logits_processors_params_validator,
)

tokenizers = pytest.importorskip("tokenizers")

FQCN = "tvc_rs.vllm:TVCLogitsProcessor"
VOCAB = 151936  # Qwen2-VL's logits rows; its tokenizer has 151657 ids
CAL = DEFAULT_CALIBRATION_TOKEN_ID
NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A Qwen2-VL-2B model folder without weights: the real config, tokenizer and processor
    files (links to the assets)."""
    qwen = asset("qwen2-vl")
    config = asset("model_configs/Qwen2-VL-2B-Instruct.config.TangLinJie-Qwen2-VL-bm.json")
    folder = tmp_path_factory.mktemp("qwen2-vl-2b")
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
                 "generation_config.json", "added_tokens.json", "special_tokens_map.json"]:
        (folder / name).symlink_to(qwen / name)
    (folder / "config.json").symlink_to(config)
    return folder


@pytest.fixture(scope="session")
def vllm_config(model_dir):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=str(model_dir),
        max_model_len=16384,
        max_num_seqs=64,
        enable_mm_embeds=True,
        limit_mm_per_prompt={"image": 8},
        mm_processor_cache_gb=0,  # every request carries its processed images (checked below)
    )
    return args.create_engine_config()


def config_with(vllm_config, *, additional=None, logits_processors=None, tokenizer=None):
    """A copy of the engine configuration with other TVC-related settings."""
    config = copy.copy(vllm_config)
    config.additional_config = additional if additional is not None else {}
    model = copy.copy(vllm_config.model_config)
    model.logits_processors = logits_processors
    if tokenizer is not None:
        model.tokenizer = tokenizer
    config.model_config = model
    return config


@pytest.fixture(scope="session")
def input_processor(vllm_config):
    from vllm.v1.engine.input_processor import InputProcessor

    return InputProcessor(vllm_config)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def cpu_runner_buffers():
    """What vLLM's CPU worker does before it builds the V2 runner (vllm/v1/worker/cpu_worker.py
    imports vllm.v1.worker.cpu.shm): host buffers instead of pinned / UVA memory."""
    if not torch.cuda.is_available():
        import vllm.v1.worker.cpu.shm  # noqa: F401


@pytest.fixture(scope="session")
def scripts(tokenizer):
    """Real long-CoT token streams (English traces) to play the model's outputs."""
    out = []
    for name in ["traces/qwen_blog_qvq72b_qwq32b_official.jsonl", "traces/marco_o1_cot_demo.jsonl"]:
        for line in asset(name).open():
            response = json.loads(line)["response"]
            if response.isascii():
                ids = tokenizer.encode(response, add_special_tokens=False).ids
                words = [i for i, t in enumerate(ids) if tokenizer.decode([t]).strip().lower() in ("wait", "hmm", "alternatively")]
                out.append((ids, words))
    assert len(out) > 20 and sum(len(w) for _, w in out) > 50
    return out


# ----------------------------------------------------------------- plain-Python model of TVC


def random_settings(rng: random.Random) -> TVCSettings:
    return TVCSettings(
        warmup=rng.choice([0, 0, 10, 40]),
        min_gap=rng.choice([0, 0, 5, 30]),
        max_calibrations=rng.choice([None, None, 1, 2, 0]),
        period=rng.choice([None, None, None, 25, 90]),
        calibrations_made=rng.choice([0, 0, 1]),
        tokens_since_last=rng.choice([None, 0, 12]),
        calibration_token=rng.choice([None, CAL]),
    )


class Request:
    """One request of the simulated engine: a prompt, the tokens the 'model' will produce (a
    real trace slice with a few ids beyond the tokenizer, as models with wider logits can
    sample), and TVC settings or none."""

    counter = 0

    def __init__(self, rng: random.Random, scripts, tokenizer, phrases, tvc: bool):
        Request.counter += 1
        self.id = f"req-{Request.counter}"
        self.prompt = [rng.randrange(0, 151643) for _ in range(rng.randint(2, 24))]
        base, triggers = rng.choice(scripts)
        if triggers and rng.random() < 0.7:  # most slices run into a reflection word
            lead = rng.randint(3, 50)
            start = max(0, rng.choice(triggers) - lead)
            script = list(base[start : start + lead + rng.randint(5, 60)])
        else:
            start = rng.randrange(0, max(1, len(base) - 60))
            script = list(base[start : start + rng.randint(10, 90)])
        for _ in range(rng.randint(0, 3)):
            script.insert(rng.randrange(0, len(script) + 1), rng.randrange(151657, VOCAB))
        self.script = script
        self.outputs: list[int] = []
        self.settings = random_settings(rng) if tvc else None
        stop = [CAL] if tvc else rng.choice([[], [151645]])
        extra = {"other_plugin": 1}
        if tvc:
            extra.update(self.settings.to_extra_args())
        self.params = SamplingParams(max_tokens=1000, stop_token_ids=stop, extra_args=extra)
        self.expected = ExpectedStream(tokenizer, phrases, self.settings) if tvc else None
        self.computed = 0
        self.prefill_len = len(self.prompt)
        self.slot = -1
        self.forced = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.outputs

    @property
    def cal(self) -> int:
        return self.settings.calibration_token if self.settings.calibration_token is not None else CAL

    def sample(self) -> int | None:
        """The model's next token, or None at its end of text."""
        i = len(self.outputs)
        return self.script[i] if i < len(self.script) else None

    def take(self, token: int) -> None:
        self.outputs.append(token)
        if self.expected is not None:
            self.expected.push(token)


def check_rows(out: torch.Tensor, before: torch.Tensor, forced_rows: dict[int, int]) -> None:
    """Forced rows: -inf everywhere but their calibration token (0); all others bit-identical."""
    keep = torch.ones(out.shape[0], dtype=torch.bool)
    if forced_rows:
        rows = torch.tensor(list(forced_rows))
        tokens = torch.tensor(list(forced_rows.values()))
        keep[rows] = False
        forced = out[rows]
        assert (forced[torch.arange(len(rows)), tokens] == 0).all(), "calibration token not at 0"
        forced[torch.arange(len(rows)), tokens] = NEG_INF
        assert torch.isneginf(forced).all(), f"rows {sorted(forced_rows)} not forced"
    assert torch.equal(out[keep], before[keep]), "a row that is not forced was changed"


# --------------------------------------------------------------------------- settings and admission


GOOD = [
    ({"tvc": {}}, TVCSettings()),
    ({"tvc": {"min_gap": 64, "max_calibrations": 3, "calibration_token": CAL}}, TVCSettings(min_gap=64, max_calibrations=3, calibration_token=CAL)),
    ({"tvc": 1, "tvc_period": 200, "tvc_warmup": 16}, TVCSettings(period=200, warmup=16)),
    ({"tvc": True, "tvc_tokens_since_last": None}, TVCSettings()),
    ({"tvc": {"calibrations_made": 2, "tokens_since_last": 0}}, TVCSettings(calibrations_made=2, tokens_since_last=0)),
]
OFF = [None, {}, {"tvc": None}, {"tvc": False}, {"tvc": 0}, {"kv_transfer_params": {"x": 1}}]
BAD = [
    ({"tvc": {"min_gap": -1}}, re.escape("extra_args['tvc']['min_gap'] = -1: must be >= 0")),
    ({"tvc": {"period": 0}}, re.escape("extra_args['tvc']['period'] = 0: must be >= 1")),
    ({"tvc": {"warmup": "64"}}, re.escape("extra_args['tvc']['warmup'] = '64': expected an integer >= 0, got str")),
    ({"tvc": {"max_calibrations": 2.0}}, re.escape("['max_calibrations'] = 2.0: expected an integer >= 0 or None, got float")),
    ({"tvc": {"min_gap": True}}, re.escape("['min_gap'] = True: expected an integer >= 0, got bool")),
    ({"tvc": {"calibrations_made": 2**32}}, re.escape("['calibrations_made'] = 4294967296: must be <= 4294967295")),
    ({"tvc": {"min_gapp": 3}}, re.escape("extra_args['tvc']: unknown setting 'min_gapp'")),
    ({"tvc": 1, "tvc_min_gap": -5}, re.escape("extra_args['tvc_min_gap'] = -5: must be >= 0")),
    ({"tvc": 1, "tvc_perod": 5}, re.escape("extra_args: unknown setting 'tvc_perod'")),
    ({"tvc_min_gap": 5}, re.escape("tvc_min_gap given but TVC is not enabled")),
    ({"tvc": {"min_gap": 1}, "tvc_period": 5}, re.escape("use one form")),
    ({"tvc": "yes"}, re.escape("extra_args['tvc'] = 'yes': expected a dict of TVC settings")),
    ({"tvc": [1]}, re.escape("extra_args['tvc'] = [1]")),
    ({"tvc": {"calibration_token": -1}}, re.escape("['calibration_token'] = -1: must be >= 0")),
]


@pytest.mark.parametrize("extra, expected", GOOD)
def test_settings_are_read_in_both_forms(extra, expected):
    assert TVCSettings.from_extra_args(extra) == expected
    assert TVCSettings.from_extra_args(expected.to_extra_args()) == expected


@pytest.mark.parametrize("extra", OFF)
def test_requests_without_tvc_settings_are_off(extra):
    assert TVCSettings.from_extra_args(extra) is None
    TVCLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_settings_are_refused_by_validate_params(extra, message):
    params = SamplingParams(extra_args=extra, stop_token_ids=[CAL])
    with pytest.raises(ValueError, match=message):
        TVCLogitsProcessor.validate_params(params)
    # vLLM's own admission hooks of both runners report it as a validation error (HTTP 400).
    with pytest.raises(VLLMValidationError, match=message):
        build_custom_logits_processors_params_validator([FQCN])(params)
    with pytest.raises(VLLMValidationError, match=message):
        validate_logits_processors_parameters([FQCN], params)


FIELDS = {  # name: (minimum, None allowed)
    "warmup": (0, False), "min_gap": (0, False), "max_calibrations": (0, True), "period": (1, True),
    "calibrations_made": (0, False), "tokens_since_last": (0, True), "calibration_token": (0, True),
}
VALUES = st.one_of(st.integers(-3, 2**33), st.none(), st.booleans(), st.floats(-2, 2), st.text(max_size=3), st.just([1]))


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.sampled_from(sorted(FIELDS)), VALUES, max_size=4), flat=st.booleans())
def test_random_settings_are_accepted_exactly_when_valid(values, flat):
    def valid(name, v):
        minimum, nullable = FIELDS[name]
        if v is None:
            return nullable
        limit = 2**32 - 1 if name in ("max_calibrations", "calibrations_made") else 2**63 - 1
        return type(v) is int and minimum <= v <= limit

    extra = {"tvc": 1, **{f"tvc_{k}": v for k, v in values.items()}} if flat else {"tvc": values}
    stop = [values["calibration_token"]] if isinstance(values.get("calibration_token"), int) else []
    params = SamplingParams(extra_args=extra, stop_token_ids=[t for t in stop if type(t) is int and 0 <= t < 2**63])
    bad = [k for k, v in values.items() if not valid(k, v)]
    if bad:
        with pytest.raises(ValueError) as error:
            TVCLogitsProcessor.validate_params(params)
        assert any((f"tvc_{k}" if flat else f"['{k}']") in str(error.value) for k in bad), str(error.value)
    else:
        TVCLogitsProcessor.validate_params(params)
        assert TVCSettings.from_extra_args(extra) == TVCSettings(**values)


def test_calibration_token_must_stop_the_request_and_grammar_is_refused():
    with pytest.raises(ValueError, match=re.escape("calibration_token 151654 must also be in stop_token_ids")):
        TVCLogitsProcessor.validate_params(SamplingParams(extra_args={"tvc": {"calibration_token": CAL}}))
    from vllm.sampling_params import StructuredOutputsParams

    grammar = SamplingParams(extra_args={"tvc": {}}, structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    with pytest.raises(ValueError, match=re.escape("cannot be combined with structured_outputs")):
        TVCLogitsProcessor.validate_params(grammar)


def test_admission_through_vllms_input_processor(input_processor):
    """The real frontend path (what LLM.generate and the server call) runs the entry-point
    processor's validate_params."""
    prompt = {"prompt_token_ids": [151644, 872, 198, 14190, 151645]}
    good = tvc_sampling_params(SamplingParams(max_tokens=64), tvc_rs.PVCSchedule(min_gap=32))
    request = input_processor.process_inputs("ok", prompt, good, supported_tasks=("generate",))
    assert request.sampling_params.extra_args["tvc"] == {"min_gap": 32, "calibration_token": CAL}
    assert CAL in request.sampling_params.stop_token_ids
    bad = SamplingParams(extra_args={"tvc": {"min_gap": -3}})
    with pytest.raises(VLLMValidationError, match=re.escape("['min_gap'] = -3")):
        input_processor.process_inputs("bad", prompt, bad, supported_tasks=("generate",))


def test_tvc_sampling_params_copies():
    base = SamplingParams(max_tokens=77, stop_token_ids=[151645], extra_args={"tvc_period": 3, "keep": "me"})
    params = tvc_sampling_params(base, tvc_rs.PVCSchedule(warmup=5, period=100), calibrations_made=1, tokens_since_last=0)
    assert params.extra_args == {"keep": "me", "tvc": {"warmup": 5, "period": 100, "calibrations_made": 1, "tokens_since_last": 0, "calibration_token": CAL}}
    assert params.stop_token_ids == [151645, CAL] and CAL in params._all_stop_token_ids
    assert params.max_tokens == 77
    assert base.extra_args == {"tvc_period": 3, "keep": "me"} and base.stop_token_ids == [151645]
    TVCLogitsProcessor.validate_params(params)
    assert tvc_sampling_params(base, max_tokens=5).max_tokens == 5


# ---------------------------------------------------------------------------------- loading


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group="vllm.logits_processors") if e.value == FQCN]
    assert found and found[0].load() is TVCLogitsProcessor


def test_v2_loaders(vllm_config, cpu_runner_buffers):
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        _load_v2_logitsprocs_by_fqcns,
        _load_v2_logitsprocs_plugins,
    )
    from vllm.v1.worker.gpu.states import RequestState

    assert TVCLogitsProcessor in _load_v2_logitsprocs_plugins()
    assert _load_v2_logitsprocs_by_fqcns([FQCN, TVCLogitsProcessor]) == [TVCLogitsProcessor, TVCLogitsProcessor]

    # A class implementing only the legacy interface is refused by the V2 loader: the reason
    # TVCLogitsProcessor implements both.
    from vllm.v1.sample.logits_processor import LogitsProcessor as LegacyOnly

    class Legacy(LegacyOnly):
        def __init__(self, vllm_config, device, is_pin_memory): ...
        def apply(self, logits): return logits
        def is_argmax_invariant(self): return True
        def update_state(self, batch_update): ...

    with pytest.raises(ValueError, match=re.escape("is not a subclass of vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor")):
        _load_v2_logitsprocs_by_fqcns([Legacy])
    states = RequestState(max_num_reqs=8, max_model_len=64, max_num_batched_tokens=64, num_speculative_steps=0,
                          vocab_size=VOCAB, device=torch.device("cpu"))
    built = build_custom_logits_processors(vllm_config, states, False, (FQCN,))
    # The entry point's instance plus the named one: both are this class.
    assert [type(p) for p in built] == [TVCLogitsProcessor, TVCLogitsProcessor]
    assert built[0]._runner == "v2" and built[0]._capacity == 8


def test_legacy_loader(vllm_config):
    procs = build_logitsprocs(vllm_config, torch.device("cpu"), False, False, (FQCN,))
    ours = [p for p in procs.non_argmax_invariant if isinstance(p, TVCLogitsProcessor)]
    assert len(ours) == 2 and not any(isinstance(p, TVCLogitsProcessor) for p in procs.argmax_invariant)
    assert ours[0]._runner == "legacy" and ours[0]._capacity == vllm_config.scheduler_config.max_num_seqs


def test_explicit_configuration_loads_at_start_and_refuses_a_tokenizer_without_the_token(vllm_config, tmp_path):
    named = config_with(vllm_config, logits_processors=[FQCN])
    proc = TVCLogitsProcessor(named, torch.device("cpu"), False)
    assert proc._state == "ready" and proc._default_cal_token == CAL

    missing = config_with(vllm_config, additional={"tvc": {"calibration_token": "<|tvc_calibrate|>"}})
    with pytest.raises(ValueError, match=re.escape("calibration token '<|tvc_calibrate|>': the tokenizer has no such token")):
        TVCLogitsProcessor(missing, torch.device("cpu"), False)

    # A tokenizer without Qwen2-VL's special tokens (a word-level one written here).
    from tokenizers import Tokenizer, models, pre_tokenizers

    small = Tokenizer(models.WordLevel({"wait": 0, "[UNK]": 1, ",": 2}, unk_token="[UNK]"))
    small.pre_tokenizer = pre_tokenizers.Whitespace()
    small.save(str(tmp_path / "tokenizer.json"))
    other = config_with(vllm_config, logits_processors=[TVCLogitsProcessor], tokenizer=str(tmp_path))
    with pytest.raises(ValueError, match=re.escape("calibration token '<|vision_pad|>': the tokenizer has no such token")):
        TVCLogitsProcessor(other, torch.device("cpu"), False)
    with pytest.raises(ValueError, match=re.escape("additional_config['tvc']: unknown setting 'phrase'")):
        TVCLogitsProcessor(config_with(vllm_config, additional={"tvc": {"phrase": ["x"]}}), torch.device("cpu"), False)
    with pytest.raises(ValueError, match=re.escape("calibration token id 151700: not a token of the tokenizer")):
        TVCLogitsProcessor(config_with(vllm_config, additional={"tvc": {"calibration_token": 151700}}), torch.device("cpu"), False)

    # Loaded only through the entry point, the same tokenizer leaves TVC off (an engine that did
    # not ask for TVC keeps running) and TVC requests untouched.
    quiet = config_with(vllm_config, tokenizer=str(tmp_path))
    proc = TVCLogitsProcessor(quiet, torch.device("cpu"), False)
    assert proc._state == "unloaded"
    builder = BatchUpdateBuilder()
    out: list[int] = []
    builder.added.append((0, tvc_sampling_params(), None, out))
    proc.update_state(builder.get_and_reset(1))
    assert proc._state == "failed" and not proc._watched.any()
    logits = torch.randn(1, VOCAB)
    before = logits.clone()
    out.append(14190)
    assert torch.equal(proc.apply(logits), before)


# ----------------------------------------------------------------------- V2 model runner


class V2Engine:
    """The V2 model runner's side of the processor contract, on vLLM's own RequestState:
    slots from its free list, add_request / apply_staged_writes at admission, one apply per step
    with a LogitsContext in a fresh batch order. ``tp`` processors follow batch-sharded sampling
    (rank r samples the requests of slots ``% tp == r``, vllm/v1/worker/gpu/sample/batch_shard.py)."""

    def __init__(self, vllm_config, capacity: int, tp: int):
        from vllm.v1.worker.gpu.states import RequestState

        self.states = RequestState(max_num_reqs=capacity, max_model_len=4096, max_num_batched_tokens=8192,
                                   num_speculative_steps=0, vocab_size=VOCAB, device=torch.device("cpu"))
        self.single = self._build(vllm_config)
        self.ranks = [self._build(vllm_config) for _ in range(tp)]
        self.tp = tp

    def _build(self, vllm_config):
        # As the runner does it: entry-point plugins first (here the only one).
        (proc,) = [p for p in build_custom_logits_processors(vllm_config, self.states, False, ()) if isinstance(p, TVCLogitsProcessor)]
        return proc

    @property
    def processors(self):
        return [self.single, *self.ranks]

    def add(self, req: Request) -> None:
        tokens = req.tokens
        self.states.add_request(req.id, prompt_len=len(req.prompt), all_token_ids=tokens, num_computed_tokens=0, max_tokens=10**6)
        req.slot = self.states.req_id_to_index[req.id]
        # The runner writes the staged token ids with a Triton kernel (StagedWriteTensor.apply_write),
        # which needs a GPU; on the CPU the same values go in directly.
        self.states.all_token_ids.gpu[req.slot, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        for t in (self.states.all_token_ids, self.states.total_len, self.states.num_computed_tokens):
            t.clear_staged_writes()
        req.computed, req.prefill_len = 0, len(tokens)
        for proc in self.processors:
            proc.add_request(req.slot, req.params)

    def remove(self, req: Request) -> None:
        assert self.states.remove_request(req.id) == req.slot

    def after_adds(self) -> None:
        for proc in self.processors:
            proc.apply_staged_writes()

    def step(self, batch: list[tuple[Request, int]], logits: torch.Tensor) -> torch.Tensor:
        slots = np.array([r.slot for r, _ in batch], dtype=np.int64)
        seq_lens = np.array([r.computed + n for r, n in batch], dtype=np.int32)
        input_ids = [r.tokens[s - 1] for (r, _), s in zip(batch, seq_lens)]

        def context(rows):
            return LogitsContext(
                expanded_idx_mapping=torch.from_numpy(slots[rows]),
                idx_mapping=torch.from_numpy(slots[rows]),
                idx_mapping_np=slots[rows],
                expanded_local_pos=torch.zeros(len(rows), dtype=torch.int32),
                input_ids=torch.tensor([input_ids[i] for i in rows], dtype=torch.int32),
                pos=torch.from_numpy(seq_lens[rows].astype(np.int64) - 1),
                seq_lens_upper_bound_np=seq_lens[rows],
            )

        everything = np.arange(len(batch))
        out = self.single.apply(logits.clone(), context(everything))
        sharded = logits.clone()
        for rank, proc in enumerate(self.ranks):
            rows = everything[slots % self.tp == rank]
            if rows.size:
                sharded[rows] = proc.apply(logits[rows].clone(), context(rows))
        assert torch.equal(out, sharded), "tensor-parallel ranks disagree with one processor"
        return out


@pytest.mark.parametrize("seed", [1, 2])
def test_v2_runner_churn_against_the_python_model(vllm_config, cpu_runner_buffers, tokenizer, scripts, seed):
    rng = random.Random(seed)
    phrases = list(tvc_rs.DEFAULT_PHRASES)
    engine = V2Engine(vllm_config, capacity=12, tp=2)
    pool = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(seed))
    active: list[Request] = []
    preempted: list[Request] = []
    forced_total = finished = 0
    for step in range(240):
        # Churn: preemptions and new or resumed requests (slots come from the free list).
        for req in [r for r in active if r.outputs and rng.random() < 0.03]:
            engine.remove(req)
            active.remove(req)
            preempted.append(req)
        while len(active) < 10 and rng.random() < 0.6:
            if preempted and rng.random() < 0.5:
                req = preempted.pop(0)
            else:
                req = Request(rng, scripts, tokenizer, phrases, tvc=rng.random() < 0.65)
            engine.add(req)
            active.append(req)
        engine.after_adds()

        batch = []
        for req in rng.sample(active, len(active)):
            if rng.random() < 0.15:
                continue  # not scheduled this step
            left = req.prefill_len - req.computed
            batch.append((req, rng.randint(1, left) if left > 0 else 1))
        if not batch:
            continue
        expected = {}
        for row, (req, n) in enumerate(batch):
            samples = req.computed + n >= req.prefill_len
            if samples and req.expected is not None and req.expected.pending:
                expected[row] = req.cal
        logits = pool[torch.randint(0, len(pool), (len(batch),))]
        out = engine.step(batch, logits)
        check_rows(out, logits, expected)

        for row, (req, n) in enumerate(batch):
            req.computed += n
            if req.computed < req.prefill_len:
                continue  # an intermediate prefill chunk: its sample is dropped
            if row in expected:
                req.expected.pending = False
                forced_total += 1
                token = None  # the request ends at its calibration token
            else:
                token = req.sample()
            if token is None:
                engine.remove(req)
                active.remove(req)
                finished += 1
            else:
                req.take(token)
    assert forced_total >= 5 and finished >= 20, (forced_total, finished)


def test_v2_speculative_rows_and_skipped_tokens(vllm_config, cpu_runner_buffers, tokenizer):
    """With several rows per request (speculative decoding) the processor acts on each
    request's first row and reads the tokens accepted since its last step from the runner's
    token buffer."""
    engine = V2Engine(vllm_config, capacity=4, tp=1)
    proc = engine.single
    text = tokenizer.encode("We get 12 apples. Hmm, that seems off.", add_special_tokens=False).ids
    hmm = next(i for i in range(len(text)) if tokenizer.decode(text[: i + 1]).endswith("Hmm,"))
    req = Request(random.Random(0), [(text, [])], tokenizer, ["hmm"], tvc=True)
    req.settings = TVCSettings(calibration_token=CAL)
    req.params = tvc_sampling_params(SamplingParams(max_tokens=100))
    req.prompt = [151644, 872, 198]
    req.script = text
    engine.add(req)
    engine.after_adds()
    rows_per_req = 3
    # Step 1: prefill, first sample. Then steps that commit 3 tokens at a time.
    committed = 0
    forced_at = None
    while forced_at is None and committed < len(text):
        pos0 = len(req.prompt) + committed - 1
        slots = np.array([req.slot] * rows_per_req)
        ids = [req.tokens[pos0]] + text[committed : committed + rows_per_req - 1]
        ctx = LogitsContext(
            expanded_idx_mapping=torch.from_numpy(slots),
            idx_mapping=torch.tensor([req.slot]),
            idx_mapping_np=np.array([req.slot]),
            expanded_local_pos=torch.arange(rows_per_req, dtype=torch.int32),
            input_ids=torch.tensor(ids, dtype=torch.int32),
            pos=torch.arange(pos0, pos0 + rows_per_req),
            seq_lens_upper_bound_np=np.array([pos0 + rows_per_req], dtype=np.int32),
        )
        logits = torch.randn(rows_per_req, VOCAB)
        out = proc.apply(logits.clone(), ctx)
        if torch.isneginf(out[0]).any():
            check_rows(out, logits, {0: CAL})
            forced_at = committed
            break
        check_rows(out, logits, {})
        # Accept all drafts plus the bonus token: 3 more committed tokens.
        new = text[committed : committed + rows_per_req]
        engine.states.all_token_ids.gpu[req.slot, len(req.prompt) + committed : len(req.prompt) + committed + len(new)] = torch.tensor(new, dtype=torch.int32)
        req.outputs.extend(new)
        committed += len(new)
    # The trigger is confirmed by the token that completes "Hmm," (the comma is the character
    # after the phrase); with 3 tokens per step the forced row comes at the first step whose
    # committed tokens include it (at most 2 tokens late).
    confirm = hmm
    assert forced_at is not None and confirm < forced_at <= confirm + rows_per_req
    assert proc._streams.calibrations(req.slot)[0].token_index == confirm


# ----------------------------------------------------------------------- legacy model runner


class LegacyEngine:
    """The legacy runner's persistent batch as vllm/v1/worker/gpu_input_batch.py keeps it:
    removed indices are refilled by adds first, the rest condensed by moving the last request
    down (UNIDIRECTIONAL), reordering by SWAP; one BatchUpdate per step, built by vLLM's
    BatchUpdateBuilder."""

    def __init__(self, vllm_config):
        procs = build_logitsprocs(vllm_config, torch.device("cpu"), False, False, ())
        assert isinstance(procs, LogitsProcessors)
        (self.proc,) = [p for p in procs.all if isinstance(p, TVCLogitsProcessor)]
        self.builder = BatchUpdateBuilder()
        self.slots: list[Request | None] = []

    @property
    def num_reqs(self) -> int:
        return sum(r is not None for r in self.slots)

    def remove(self, req: Request) -> None:
        i = self.slots.index(req)
        self.slots[i] = None
        self.builder.removed_append(i)

    def add(self, req: Request, output_list: list[int]) -> None:
        i = self.builder.pop_removed()
        if i is None:
            i = len(self.slots)
            self.slots.append(None)
        self.slots[i] = req
        self.builder.added.append((i, req.params, req.prompt, output_list))

    def condense_and_reorder(self, rng: random.Random) -> None:
        removed = self.builder.removed  # descending
        while removed:
            last = max((i for i, r in enumerate(self.slots) if r is not None), default=-1)
            empty = self.builder.peek_removed()
            if empty >= last:
                break
            self.builder.pop_removed()
            self.slots[empty], self.slots[last] = self.slots[last], None
            self.builder.moved.append((last, empty, MoveDirectionality.UNIDIRECTIONAL))
        del self.slots[self.num_reqs :]
        for _ in range(rng.randint(0, 3)):
            if len(self.slots) > 1:
                a, b = rng.sample(range(len(self.slots)), 2)
                self.slots[a], self.slots[b] = self.slots[b], self.slots[a]
                self.builder.moved.append((a, b, MoveDirectionality.SWAP))
        self.proc.update_state(self.builder.get_and_reset(len(self.slots)))


@pytest.mark.parametrize("seed", [4, 5])
def test_legacy_runner_churn_against_the_python_model(vllm_config, tokenizer, scripts, seed):
    rng = random.Random(seed)
    phrases = list(tvc_rs.DEFAULT_PHRASES)
    engine = LegacyEngine(vllm_config)
    pool = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(seed))
    waiting: list[Request] = []
    forced_total = finished = 0
    for step in range(240):
        for req in [r for r in engine.slots if r is not None and r.outputs and rng.random() < 0.03]:
            engine.remove(req)
            waiting.append(req)  # preempted
        while engine.num_reqs < 10 and rng.random() < 0.6:
            if waiting and rng.random() < 0.5:
                req = waiting.pop(0)
                # A resumed request brings a new list holding its outputs so far (async mode).
                req.output_list = list(req.outputs)
                req.computed, req.prefill_len = 0, len(req.tokens)
            else:
                req = Request(rng, scripts, tokenizer, phrases, tvc=rng.random() < 0.65)
                req.output_list = req.outputs
            engine.add(req, req.output_list)
        engine.condense_and_reorder(rng)
        if not engine.slots:
            continue
        # Every request in the batch gets a logits row; those still in a chunked prefill have
        # their sample dropped. A request that has a calibration pending is forced until its
        # next token shows up.
        chunk = {}
        expected = {}
        for row, req in enumerate(engine.slots):
            left = req.prefill_len - req.computed
            chunk[row] = rng.randint(1, left) if left > 0 else 1
            if req.expected is not None and req.expected.pending:
                expected[row] = req.cal
        logits = pool[torch.randint(0, len(pool), (len(engine.slots),))]
        out = engine.proc.apply(logits.clone())
        check_rows(out, logits, expected)
        for row, req in enumerate(list(engine.slots)):
            req.computed += chunk[row]
            if req.computed < req.prefill_len:
                continue
            if row in expected:
                req.expected.pending = False
                forced_total += 1
                token = None
            else:
                token = req.sample()
            if token is None:
                engine.remove(req)
                finished += 1
            else:
                req.take(token)
                if req.output_list is not req.outputs:
                    req.output_list.append(token)
    assert forced_total >= 5 and finished >= 20, (forced_total, finished)


def test_legacy_placeholders_turn_tvc_off_with_a_warning(vllm_config, caplog):
    """Under async scheduling the legacy runner fills sampled ids into the output lists only
    for processors named in logits_processors; the entry-point instance then sees -1."""
    engine = LegacyEngine(vllm_config)
    req_list: list[int] = []
    engine.builder.added.append((0, tvc_sampling_params(), [1, 2], req_list))
    engine.proc.update_state(engine.builder.get_and_reset(1))
    req_list.append(-1)
    logits = torch.randn(1, VOCAB)
    out = engine.proc.apply(logits.clone())
    assert torch.equal(out, logits) and not engine.proc._watched.any()


# ----------------------------------------------------------------------------- the PVC driver


def reference_calibration(tokenizer, ids, schedule_settings) -> tuple[int | None, str | None]:
    """Index and phrase of the first calibration the plain-Python model makes on ``ids``."""
    model = ExpectedStream(tokenizer, list(tvc_rs.DEFAULT_PHRASES), schedule_settings)
    for token in ids:
        model.push(token)
        if model.calibrations:
            return model.calibrations[0], model.phrases[0]
    return None, None


def finished_output(request, token_ids, *, stop_at_calibration: bool, cal=CAL, cached=0) -> RequestOutput:
    ids = list(token_ids) + ([cal] if stop_at_calibration else [151645])
    completion = CompletionOutput(index=0, text="", token_ids=ids, cumulative_logprob=None, logprobs=None,
                                  finish_reason="stop", stop_reason=cal if stop_at_calibration else None)
    return RequestOutput(request_id=request.request_id, prompt=None, prompt_token_ids=list(request.prompt_token_ids),
                         prompt_logprobs=None, outputs=[completion], finished=True, num_cached_tokens=cached)


PROMPT_1 = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>Subtract all red cubes. How many objects are left?<|im_end|>\n"
            "<|im_start|>assistant\n")
PROMPT_2 = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
            "Which picture has more objects?<|im_end|>\n<|im_start|>assistant\n")
ANSWER = ("I count the objects in the image: a red cube, a blue sphere and a green cylinder. Removing the red cube "
          "leaves 2. Wait, I should double check whether there is a small cube behind the sphere. Looking again, "
          "hmm, there might be one more object. So the answer is 3.")


def images(n: int):
    from PIL import Image

    paths = [asset("images/tvc_case1_clevr.jpg")] + sorted(asset("images/mathv").glob("*"))[:3]
    return [Image.open(p).convert("RGB") for p in paths[:n]]


def process(input_processor, prompt, params, name="r"):
    return input_processor.process_inputs(name, prompt, params, supported_tasks=("generate",))


def placeholders(request):
    return [(f.mm_position.offset, f.mm_position.length) for f in request.mm_features]


@pytest.mark.parametrize("mode", ["relocate", "append"])
@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("pool", [4, 2])
def test_driver_prompts_through_vllms_qwen2_vl_processing(vllm_config, input_processor, tokenizer, mode, count, pool):
    tok = input_processor.tokenizer
    pvc = PVCConfig(mode=mode, pool=pool)
    driver = _Driver(vllm_config, tok, pvc)
    pics = images(count)
    session = _Session(driver, TVCRequest(prompt=PROMPT_1 if count == 1 else PROMPT_2, images=pics,
                                          sampling_params=SamplingParams(max_tokens=500, temperature=0.6)), "q")
    prompt, params = session.first()
    first = process(input_processor, prompt, params, "first")
    # vLLM expands each <|image_pad|> to grid_h * grid_w / 4 tokens.
    grids = [tuple(int(v) for v in f.data["image_grid_thw"].data.tolist()) for f in first.mm_features]
    assert [n for _, n in placeholders(first)] == [t * h * w // 4 for t, h, w in grids]

    answer = tokenizer.encode(ANSWER, add_special_tokens=False).ids
    settings = TVCSettings.from_schedule(pvc.schedule)
    at, phrase = reference_calibration(tokenizer, answer, settings)
    assert at is not None
    part1 = answer[: at + 1]
    cont = session.on_finished(finished_output(first, part1, stop_at_calibration=True))
    params2 = session.next_params()
    assert params2.max_tokens == 500 - len(part1) and params2.temperature == 0.6
    assert params2.extra_args["tvc"]["calibrations_made"] == 1 and params2.extra_args["tvc"]["tokens_since_last"] == 0
    second = process(input_processor, cont, params2, "second")

    (cal,) = session.calibrations
    assert (cal.token_index, cal.mode) == (at, mode)
    assert cal.phrase == phrase == "wait" and cal.reason == "trigger"
    # The compressed images: ceil(h / pool) x ceil(w / pool) merged cells each, where (h, w) is
    # the original's merged grid (vLLM's own count, above) -- unless that falls below the
    # processor's min_pixels (56 x 56), which it does not for these images.
    expect = [math.ceil(h // 2 / pool) * math.ceil(w // 2 / pool) for _, h, w in grids]
    new = placeholders(second)[-count:]
    assert [n for _, n in new] == expect and cal.image_tokens == sum(expect)

    bridge = tok.encode(" " + pvc.bridge, add_special_tokens=False)
    ids2 = second.prompt_token_ids
    if mode == "append":
        # Everything before the bridge is the first request's prompt and its tokens, token for
        # token, with the same images (same hashes): vLLM's prefix cache serves it.
        head = len(first.prompt_token_ids) + len(part1)
        assert ids2[:head] == first.prompt_token_ids + part1
        assert [f.identifier for f in second.mm_features[:count]] == [f.identifier for f in first.mm_features]
        assert placeholders(second)[:count] == placeholders(first)
    else:
        # The question without its images, then the answer so far.
        question = [t for t in first.prompt_token_ids if t not in (151652, 151653, 151655)]
        head = len(question) + len(part1)
        assert ids2[:head] == question + part1
        assert len(second.mm_features) == count
    assert ids2[head : head + len(bridge)] == bridge
    at_image = head + len(bridge)
    for (offset, n) in new:
        assert ids2[at_image] == 151652 and offset == at_image + 1 and ids2[offset + n] == 151653
        assert ids2[offset : offset + n] == [151655] * n
        at_image = offset + n + 1
    assert at_image == len(ids2)

    # A second calibration, then the end of the answer.
    rest = answer[at + 1 :]
    settings2 = TVCSettings.from_schedule(pvc.schedule, calibrations_made=1, tokens_since_last=0)
    at2, phrase2 = reference_calibration(tokenizer, rest, settings2)
    assert at2 is not None
    cont3 = session.on_finished(finished_output(second, rest[: at2 + 1], stop_at_calibration=True))
    third = process(input_processor, cont3, session.next_params(), "third")
    assert len(third.mm_features) == (3 if mode == "append" else 1) * count  # relocate: the newest copies only
    assert [c.token_index for c in session.calibrations] == [at, at + 1 + at2]
    assert session.calibrations[1].phrase == phrase2 == "double check"
    if mode == "append":
        assert third.prompt_token_ids[: len(ids2)] == ids2
    assert session.on_finished(finished_output(third, rest[at2 + 1 :], stop_at_calibration=False)) is None
    result = session.result()
    assert result.token_ids == answer + [151645]
    assert result.finish_reason == "stop" and len(result.calibrations) == 2
    assert result.text.replace(" " + pvc.bridge, "") == tokenizer.decode(answer)
    assert result.text.count(pvc.bridge) == 2 and result.prompt_tokens == [
        len(first.prompt_token_ids), len(second.prompt_token_ids), len(third.prompt_token_ids)]


@pytest.mark.parametrize("mode", ["relocate", "append"])
def test_driver_with_vision_features_sends_pooled_image_embeds(vllm_config, input_processor, tokenizer, mode):
    tok = input_processor.tokenizer
    pvc = PVCConfig(mode=mode, pool=4)
    driver = _Driver(vllm_config, tok, pvc)
    grids = [(1, 18, 22), (1, 30, 14)]  # image_grid_thw rows (patches): 99 and 105 merged tokens
    gen = torch.Generator().manual_seed(0)
    features = [torch.randn(t * h * w // 4, 1536, generator=gen) for t, h, w in grids]
    session = _Session(driver, TVCRequest(prompt=PROMPT_2, vision_features=list(zip(features, grids)),
                                          sampling_params=SamplingParams(max_tokens=1000)), "e")
    prompt, params = session.first()
    first = process(input_processor, prompt, params)
    assert [n for _, n in placeholders(first)] == [99, 105]
    answer = tokenizer.encode(ANSWER, add_special_tokens=False).ids
    at, _ = reference_calibration(tokenizer, answer, TVCSettings.from_schedule(pvc.schedule))
    cont = session.on_finished(finished_output(first, answer[: at + 1], stop_at_calibration=True))
    second = process(input_processor, cont, session.next_params())
    new = second.mm_features[-2:]
    expect = [math.ceil(h / 2 / 4) * math.ceil(w / 2 / 4) for _, h, w in grids]  # 3 x 3, 4 x 2
    assert [f.mm_position.length for f in new] == expect
    assert session.calibrations[0].image_tokens == sum(expect)
    for f, x, (t, h, w) in zip(new, features, grids):
        # 4x4 average pooling on the merged grid; edge windows average the cells they cover.
        grid = x.reshape(h // 2, w // 2, -1).permute(2, 0, 1).unsqueeze(0).double()
        counts = torch.nn.functional.avg_pool2d(torch.ones(1, 1, h // 2, w // 2, dtype=torch.float64), 4, ceil_mode=True, divisor_override=1)
        sums = torch.nn.functional.avg_pool2d(grid, 4, ceil_mode=True, divisor_override=1)
        want = (sums / counts).squeeze(0).permute(1, 2, 0).reshape(-1, x.shape[1])
        got = f.data["image_embeds"].data
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert f.data["image_grid_thw"].data.tolist() == [t, 2 * math.ceil(h / 2 / 4), 2 * math.ceil(w / 2 / 4)]


def test_driver_streaming_chunk_is_only_the_new_part(vllm_config, input_processor, tokenizer):
    """The chunk a streaming-input session gets at a calibration (AsyncLLM path): the bridge
    phrase and the image block, with the compressed image; vLLM processes it as a resumable
    request with the placeholder right after the bridge."""
    tok = input_processor.tokenizer
    driver = _Driver(vllm_config, tok, PVCConfig(mode="append", pool=4))
    session = _Session(driver, TVCRequest(prompt=PROMPT_1, images=images(1), sampling_params=SamplingParams(max_tokens=1000)), "s")
    first = process(input_processor, *session.first())
    answer = tokenizer.encode(ANSWER, add_special_tokens=False).ids
    at, _ = reference_calibration(tokenizer, answer, TVCSettings())
    added = session.take_part(finished_output(first, answer[: at + 1], stop_at_calibration=True))
    chunk = input_processor.process_inputs("s", session.streaming_chunk(added), session.next_params(),
                                           supported_tasks=("generate",), resumable=True)
    bridge = tok.encode(" Let me see the image again:", add_special_tokens=False)
    ((offset, n),) = placeholders(chunk)
    assert chunk.prompt_token_ids[: len(bridge) + 1] == bridge + [151652] and offset == len(bridge) + 1
    assert n == session.calibrations[0].image_tokens and chunk.prompt_token_ids[-1] == 151653



@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random Qwen2-VL in transformers (tests/tiny_models.py) with the real tokenizer and
    processor files: tvc_rs.hf's side of the bridge comparison."""
    from tiny_models import make_tiny_qwen2_vl
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    folder = make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-hf"), asset("qwen2-vl").parent, hidden=128, layers=1)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


SPECIAL = 151644  # <|im_start|>: a special token, which the answer's text skips


@pytest.mark.parametrize(
    "answer, bridge, want",
    [
        ("I count 3 objects. Wait,", PVCConfig().bridge, " " + PVCConfig().bridge),
        ("I count 3 objects.\n", PVCConfig().bridge, PVCConfig().bridge),
        # The answer's text ends with the newline: the special token after it has no text.
        # (tvc_rs.hf used to look at the last token's text with special tokens kept, "<|im_start|>",
        # and put a space; the vLLM driver did not.)
        (("I count 3 objects.\n", SPECIAL), PVCConfig().bridge, PVCConfig().bridge),
        # More special tokens than tvc_rs.hf decodes first: the text before them counts.
        ((ANSWER, *[SPECIAL] * 9), PVCConfig().bridge, " " + PVCConfig().bridge),
        (ANSWER, PVCConfig().bridge, " " + PVCConfig().bridge),
        ("I count 3 objects. Wait,", "\nLet me look again:", "\nLet me look again:"),
        ("I count 3 objects. Wait,", "", ""),
    ],
)
def test_both_drivers_put_the_same_bridge_ids(vllm_config, input_processor, tiny_hf, answer, bridge, want):
    """tvc_rs.hf and tvc_rs.vllm, given the same generated tokens, inject the same bridge ids:
    those of ``want`` (one rule, tvc_rs.pvc.bridge_text, and the same reading of the text so
    far)."""
    from tvc_rs import hf

    tok = input_processor.tokenizer
    text, *extra = answer if isinstance(answer, tuple) else (answer,)
    ids = tok.encode(text, add_special_tokens=False) + list(extra)
    want_ids = tok.encode(want, add_special_tokens=False) if want else []
    pvc = PVCConfig(mode="append", pool=4, bridge=bridge)

    model, processor = tiny_hf
    session = hf.PVCSession(model, processor, images(1), "How many objects are left?", config=pvc)
    session.extend(ids)
    from_hf = session.calibrate().bridge_ids

    driver = _Driver(vllm_config, tok, pvc)
    vsession = _Session(driver, TVCRequest(prompt=PROMPT_1, images=images(1), sampling_params=SamplingParams(max_tokens=1000)), "b")
    first = process(input_processor, *vsession.first())
    added = vsession.take_part(finished_output(first, ids, stop_at_calibration=True))
    from_vllm = added[: added.index(151652)]  # up to the image block's <|vision_start|>

    assert from_hf == from_vllm == want_ids
    assert vsession.pieces[-1] == want

def test_driver_refuses_bad_requests(vllm_config, input_processor):
    tok = input_processor.tokenizer
    with pytest.raises(ValueError, match=re.escape("pvc.mode = 'kv': the engine has no TVC KV connector; start it with "
                                                   "kv_transfer_config=tvc_rs.vllm_kv.kv_transfer_config()")):
        _Driver(vllm_config, tok, PVCConfig(mode="kv"))
    with pytest.raises(ValueError, match=re.escape("pvc.prune = 0.25: not available with vLLM")):
        _Driver(vllm_config, tok, PVCConfig(prune=0.25))
    driver = _Driver(vllm_config, tok, None)
    with pytest.raises(ValueError, match=re.escape("the prompt holds 1 ") + ".*" + re.escape(" blocks for 2 images")):
        _Session(driver, TVCRequest(prompt=PROMPT_1, images=images(2)), "x")
    with pytest.raises(ValueError, match=re.escape("TVC needs at least one image")):
        _Session(driver, TVCRequest(prompt="<|im_start|>user\nhi<|im_end|>\n"), "x")
    with pytest.raises(ValueError, match=re.escape("not inside <|vision_start|>")):
        _Session(driver, TVCRequest(prompt="look <|image_pad|> here", images=images(1)), "x")
    with pytest.raises(ValueError, match=re.escape("vision_features[0]: 10 features for image_grid_thw (1, 18, 22)")):
        _Session(driver, TVCRequest(prompt=PROMPT_1, vision_features=[(torch.zeros(10, 1536), (1, 18, 22))]), "x")
    with pytest.raises(ValueError, match=re.escape("n = 2")):
        _Session(driver, TVCRequest(prompt=PROMPT_1, images=images(1), sampling_params=SamplingParams(n=2)), "x")
    with pytest.raises(ValueError, match=re.escape("pvc.phrases differ")):
        _Driver(config_with(vllm_config, additional={"tvc": {"phrases": ["wait"]}}), tok, PVCConfig(phrases=("hmm",)))
    with pytest.raises(ValueError, match=re.escape("pool = 0: must be >= 1")):
        PVCConfig(pool=0)
    with pytest.raises(ValueError, match=re.escape("mode = 'shift'")):
        PVCConfig(mode="shift")


def test_driver_image_settings_follow_the_engine(vllm_config, input_processor, tmp_path, monkeypatch):
    """max_pixels from the engine's mm_processor_kwargs (on the multimodal config, where vLLM
    keeps them), else the model's preprocessor_config.json, also for a hub name in the cache."""
    tok = input_processor.tokenizer
    preprocessor = json.loads((Path(vllm_config.model_config.model) / "preprocessor_config.json").read_text())
    assert _Driver(vllm_config, tok, None).image_settings["max_pixels"] == preprocessor["max_pixels"]

    config = config_with(vllm_config)
    config.model_config.multimodal_config = copy.copy(vllm_config.model_config.multimodal_config)
    config.model_config.multimodal_config.mm_processor_kwargs = {"max_pixels": 200704, "min_pixels": 3136 * 4}
    settings = _Driver(config, tok, None).image_settings
    assert (settings["max_pixels"], settings["min_pixels"]) == (200704, 3136 * 4)

    # A hub name: the preprocessor file of the Hugging Face cache's snapshot.
    import huggingface_hub.constants

    snapshot = tmp_path / "models--org--tiny-vl" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "max_pixels": 401408}))
    (tmp_path / "models--org--tiny-vl" / "refs").mkdir()
    (tmp_path / "models--org--tiny-vl" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    config = config_with(vllm_config)
    object.__setattr__(config.model_config, "model", "org/tiny-vl")
    assert _Driver(config, tok, None).image_settings["max_pixels"] == 401408


def test_kv_mode_refused_for_hybrid_models(vllm_config, model_dir, input_processor, tmp_path):
    """A model whose layers keep a recurrent state (Qwen3-Next: linear attention between full
    attention layers), as vLLM's own ModelConfig describes it: kv mode is refused, saying why,
    before anything else is checked; Qwen2-VL (attention only) is not."""
    from transformers import Qwen3NextConfig
    from vllm.config import ModelConfig

    from tvc_rs.vllm_kv import kv_mode_refusal

    Qwen3NextConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
                    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                    vocab_size=151936).save_pretrained(tmp_path)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (tmp_path / name).symlink_to(model_dir / name)
    hybrid = ModelConfig(model=str(tmp_path))
    assert hybrid.is_hybrid
    why = kv_mode_refusal(hybrid)
    assert "keep a recurrent state instead of a KV cache (linear_attention layers)" in why
    assert kv_mode_refusal(vllm_config.model_config) is None
    config = copy.copy(vllm_config)
    config.model_config = hybrid
    with pytest.raises(ValueError, match=re.escape("pvc.mode = 'kv': the model is a hybrid with layers that keep a recurrent state")):
        _Driver(config, input_processor.tokenizer, PVCConfig(mode="kv"))


def text_positions(ids, grids, merge=2):
    """M-RoPE position of each text token of an expanded Qwen2-VL sequence, by the rule written
    out: text advances by one, an image block's pads by max(t, h / merge, w / merge) of its grid."""
    out, pos, image, i = {}, 0, 0, 0
    while i < len(ids):
        if ids[i] == 151655:
            j = i
            while j < len(ids) and ids[j] == 151655:
                j += 1
            t, h, w = grids[image]
            pos += max(t, h // merge, w // merge)
            image, i = image + 1, j
            continue
        out[i] = pos
        pos, i = pos + 1, i + 1
    return out


def test_driver_kv_mode_moves_the_shared_text(vllm_config, input_processor, tokenizer):
    """kv mode: each continuation is relocate's text with the newest pooled images only, salted,
    and names the part it continues and the moves: every text token but the last, from the
    stopped part's own (expanded) sequence, with the delta new position - old position by the
    M-RoPE rule written out (an image advances positions by the longest side of its grid)."""
    from vllm.config import KVTransferConfig

    from tvc_rs.vllm_kv import kv_transfer_config

    config = copy.copy(vllm_config)
    config.kv_transfer_config = KVTransferConfig(**kv_transfer_config())
    tok = input_processor.tokenizer
    pvc = PVCConfig(mode="kv", pool=4)
    driver = _Driver(config, tok, pvc)
    grids = [(1, 18, 22), (1, 30, 14)]
    gen = torch.Generator().manual_seed(1)
    features = [torch.randn(t * h * w // 4, 1536, generator=gen) for t, h, w in grids]
    session = _Session(driver, TVCRequest(prompt=PROMPT_2, vision_features=list(zip(features, grids)),
                                          sampling_params=SamplingParams(max_tokens=1000)), "k")
    prompt, params = session.first()
    part = process(input_processor, prompt, params)
    link = params.extra_args["kv_transfer_params"]["tvc_kv"]
    assert link["hold"] == CAL and "source" not in link
    question = [t for t in tokenizer.encode(PROMPT_2, add_special_tokens=False).ids if t not in (151652, 151653, 151655)]
    answer = tokenizer.encode(ANSWER, add_special_tokens=False).ids
    pooled = [(1, 2 * math.ceil(h / 2 / 4), 2 * math.ceil(w / 2 / 4)) for _, h, w in grids]
    text, part_grids, start = list(question), grids, 0
    for k, cut in enumerate([20, 45], 1):
        held_key = link["key"]
        cont = session.on_finished(finished_output(part, answer[start:cut], stop_at_calibration=True))
        params = session.next_params()
        nxt = process(input_processor, cont, params)
        text += answer[start:cut]
        bridge = tok.encode(" " + pvc.bridge, add_special_tokens=False)
        blocks = []
        for _, h, w in pooled:
            blocks += [151652] + [151655] * (h * w // 4) + [151653]
        assert list(nxt.prompt_token_ids) == text + bridge + blocks  # relocate's text, the newest images only
        assert cont["cache_salt"] == session.kv_key
        link = params.extra_args["kv_transfer_params"]["tvc_kv"]
        assert link["source"] == held_key != link["key"]
        moves = [(d + i, s + i, (dt, dh, dw)) for d, s, n, dt, dh, dw in link["segments"] for i in range(n)]
        source = list(part.prompt_token_ids) + answer[start:cut] + [CAL]
        old = text_positions(source, part_grids)
        assert [d for d, _, _ in moves] == list(range(len(text) - 1))
        for d, s, delta in moves:
            assert source[s] == text[d] and s in old
            assert delta == (d - old[s],) * 3
        assert any(delta != (0, 0, 0) for _, _, delta in moves)
        text += bridge
        part, part_grids, start = nxt, pooled, cut


def test_driver_relocate_keeps_only_the_newest_images(vllm_config, input_processor, tokenizer):
    """relocate: each continuation is the question without its images, the text so far with every
    bridge, and the newest compressed images only (earlier copies dropped, as tvc_rs.hf does);
    no cache salt (its blocks are computed, shareable through the prefix cache)."""
    tok = input_processor.tokenizer
    pvc = PVCConfig(mode="relocate", pool=4)
    driver = _Driver(vllm_config, tok, pvc)
    grids = [(1, 18, 22), (1, 30, 14)]
    gen = torch.Generator().manual_seed(2)
    features = [torch.randn(t * h * w // 4, 1536, generator=gen) for t, h, w in grids]
    session = _Session(driver, TVCRequest(prompt=PROMPT_2, vision_features=list(zip(features, grids)),
                                          sampling_params=SamplingParams(max_tokens=1000)), "r")
    prompt, params = session.first()
    part = process(input_processor, prompt, params)
    question = [t for t in tokenizer.encode(PROMPT_2, add_special_tokens=False).ids if t not in (151652, 151653, 151655)]
    answer = tokenizer.encode(ANSWER, add_special_tokens=False).ids
    pooled = [(1, 2 * math.ceil(h / 2 / 4), 2 * math.ceil(w / 2 / 4)) for _, h, w in grids]
    blocks = []
    for _, h, w in pooled:
        blocks += [151652] + [151655] * (h * w // 4) + [151653]
    text, start = list(question), 0
    for cut in (20, 45):
        cont = session.on_finished(finished_output(part, answer[start:cut], stop_at_calibration=True))
        params = session.next_params()
        nxt = process(input_processor, cont, params)
        text += answer[start:cut] + tok.encode(" " + pvc.bridge, add_special_tokens=False)
        assert list(nxt.prompt_token_ids) == text + blocks
        assert "cache_salt" not in cont
        embeds = cont["multi_modal_data"]["image"]["image_embeds"]
        assert embeds.shape[0] == sum(h * w // 4 for _, h, w in pooled)  # two pooled images, not four
        part, start = nxt, cut
