"""Request and response models (pydantic), field for field as the anchors define them: the OpenAI
API reference (embeddings, completions, models; vLLM's sampling extensions top_k, min_tokens,
repetition_penalty, ignore_eos) and text-embeddings-inference's native routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TokenIds = list[int]


# -- OpenAI-compatible -----------------------------------------------------------------------------
class EmbeddingRequest(BaseModel):
    model: str | None = None
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM: cut to this many tokens (-1: the model's limit)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int | None = None


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float | None = Field(default=1.0, ge=0)
    top_p: float | None = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM: -1 or 0 = off
    n: int = Field(default=1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string (or eos id) that ended the choice


class CompletionResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fastlm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- TEI-compatible -------------------------------------------------------------------------------
class EmbedRequest(BaseModel):
    inputs: str | list[str] | TokenIds | list[TokenIds]
    normalize: bool = True
    truncate: bool | None = False
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    prompt_name: str | None = None
    dimensions: int | None = Field(default=None, ge=1)


class PredictRequest(BaseModel):
    inputs: str | list[str] | list[list[str]] | list[str | list[str]]
    raw_scores: bool = False
    truncate: bool | None = False
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"


class Prediction(BaseModel):
    score: float
    label: str


class RerankRequest(BaseModel):
    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = False
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


class TokenizeRequest(BaseModel):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None = None
    stop: int | None = None
