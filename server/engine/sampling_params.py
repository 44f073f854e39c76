"""Per-request sampling parameters, validated into typed errors (never asserts)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RequestError
from .grammar import GrammarSpec


class SamplingParams(BaseModel):
    """OpenAI's sampling fields plus vLLM's extras (top_k, ignore_eos, repetition_penalty)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # None = until the end of the context (OpenAI's chat default); 0 = score the prompt only, sample nothing
    max_tokens: int | None = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1 (or 0) = off
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what torch.Generator.manual_seed takes
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0)  # logits are divided or multiplied by it
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # vLLM's: drop tokens below min_p x the top token's probability
    min_tokens: int = Field(0, ge=0)  # vLLM's: EOS and stop_token_ids are masked until this many tokens
    logit_bias: dict[int, float] = Field(default_factory=dict)  # OpenAI's: token id -> bias added to its logit
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)  # top-N alternatives per token
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # the same for each prompt token (vLLM's field)
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None  # structured output: what the text must match (None = free text)
    # vLLM's field: requests share cached prefixes only with the same salt (on top of the adapter identity)
    cache_salt: str | None = Field(None, min_length=1)

    @classmethod
    def make(cls, **fields) -> SamplingParams:
        """Build from user input; a bad value is a RequestError naming the field."""
        try:
            # max_tokens=None is a choice (run to the end of the context), not "use the default"
            return cls(**{k: v for k, v in fields.items() if v is not None or k == "max_tokens"})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise RequestError(first["msg"], field=".".join(map(str, first["loc"]))) from None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def changes_logits(self) -> bool:
        """Whether sampling edits this row's logits before picking (penalties, biases, min_tokens)."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0
