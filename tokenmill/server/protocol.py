"""Pydantic models of the OpenAI wire format (the subset tokenmill serves, plus vLLM's extras).

These models are the contract: FastAPI builds the OpenAPI schema clients generate code from
out of them, so every rule a schema can say (types, required fields per message role, the
numeric ranges, list lengths) is said here, once, and a body breaking one is a 400 naming the
parameter (tokenmill.server.errors). What a schema cannot say (the vocabulary size, the
context length, what this model accepts) is checked by the server. Unknown fields are
ignored, as OpenAI clients send fields we do not implement.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenmill.sampling import MAX_CONSTRAINT_CHARS, MAX_LOGPROBS, MAX_N, StructuredOutput

# Seeds travel to torch.Generator.manual_seed, which takes a 64-bit value.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
# OpenAI's limits where it has one; the others keep one request's per-step work bounded (every
# stop string is searched for after every token, every logit_bias entry is applied to every row).
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_BEST_OF = 20
MAX_LOGIT_BIAS = 300
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    # NaN/inf would slip past range checks (every comparison with NaN is False). Strict: a JSON
    # boolean is not a number (lax mode took `"prompt": [[false]]` as token 0); ints still
    # stand for floats.
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", populate_by_name=True)
    name: str | None = Field(default=None, max_length=64)
    description: str | None = None
    json_schema: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: Int64 | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # Keys are token ids (as JSON object keys are strings); each bias is added to that logit.
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,19}$")], Annotated[float, Field(
        ge=-100.0, le=100.0)]], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Scheduling order (vLLM's): a lower value is served first; batch work runs at a high one.
    priority: Int64 = 0
    # structured output: OpenAI's response_format, and vLLM's guided_* extras
    response_format: ResponseFormat | None = None
    guided_json: dict | Annotated[str, Field(max_length=MAX_CONSTRAINT_CHARS)] | None = None
    guided_regex: Annotated[str, Field(max_length=MAX_CONSTRAINT_CHARS)] | None = None
    guided_choice: Annotated[list[str], Field(min_length=1, max_length=1024)] | None = None
    guided_grammar: Annotated[str, Field(max_length=MAX_CONSTRAINT_CHARS)] | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def structured_output(self) -> tuple[StructuredOutput | None, str | None]:
        """(the constraint asked for, the field that asked); ValueError if malformed or several."""
        asked = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", StructuredOutput(json_object=True)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise ValueError("response_format: json_schema.schema is required for type json_schema")
            asked.append(("response_format", StructuredOutput(json=rf.json_schema.json_schema)))
        for name, kw in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                         ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                try:
                    asked.append((name, StructuredOutput(**{kw: value})))
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        if len(asked) > 1:
            raise ValueError(f"{asked[1][0]}: only one structured output constraint may be given, "
                             f"got {[a for a, _ in asked]}")
        return (asked[0][1], asked[0][0]) if asked else (None, None)


class CompletionRequest(_SamplingFields):
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF)
    echo: bool = False
    suffix: str | None = None


# -- chat messages: one model per role, told apart by `role` -----------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Request):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(_Request):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(_Request):
    type: Literal["file"]
    file: FileRef


class RefusalPart(_Request):
    type: Literal["refusal"]
    refusal: str


# Parts OpenAI defines for user messages; the server refuses the non-text ones with a 400
# (this model takes text only), which is a fact about the model, not about the wire format.
UserPart = Annotated[Union[TextPart, ImagePart, AudioPart, FilePart], Field(discriminator="type")]
AssistantPart = Annotated[Union[TextPart, RefusalPart], Field(discriminator="type")]
Name = Annotated[str, Field(min_length=1, max_length=64)]


class _Message(_Request):
    def text(self) -> str:
        content = getattr(self, "content", None)
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(getattr(part, "text", None) or getattr(part, "refusal", "") for part in content)


class SystemMessage(_Message):
    role: Literal["system"]
    content: str | list[TextPart]
    name: Name | None = None


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: str | list[TextPart]
    name: Name | None = None


class UserMessage(_Message):
    role: Literal["user"]
    content: str | list[UserPart]
    name: Name | None = None


class CalledFunction(_Request):
    name: str
    arguments: str


class RequestToolCall(_Request):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantRequestMessage(_Message):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    refusal: str | None = None
    name: Name | None = None
    tool_calls: list[RequestToolCall] | None = None

    @model_validator(mode="after")
    def _content_or_tool_calls(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("content: an assistant message needs content unless it has tool_calls")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


ChatMessage = Annotated[
    Union[SystemMessage, DeveloperMessage, UserMessage, AssistantRequestMessage, ToolMessage],
    Field(discriminator="role"),
]


class FunctionDef(_Request):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


# -- responses ---------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# -- embeddings -------------------------------------------------------------------------

MAX_EMBED_INPUTS = 2048  # OpenAI's limit on the inputs of one request
EmbedText = Annotated[str, Field(min_length=1)]
EmbedIds = Annotated[list[TokenId], Field(min_length=1)]


class EmbeddingRequest(_Request):
    """OpenAI's /v1/embeddings: a text, texts, token ids, or lists of token ids (the text's
    tokens, without the model's own special tokens)."""

    input: (EmbedText | Annotated[list[EmbedText], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
            | EmbedIds | Annotated[list[EmbedIds], Field(min_length=1, max_length=MAX_EMBED_INPUTS)])
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _not_too_many(cls, value):
        # Before the union: each of its branches would report its own, less telling, error.
        if isinstance(value, list) and len(value) > MAX_EMBED_INPUTS and not all(isinstance(x, int) for x in value):
            raise ValueError(f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(value)}")
        return value

    @property
    def inputs(self) -> list[str] | list[list[int]]:
        x = self.input
        if isinstance(x, str) or isinstance(x[0], int):
            return [x]
        return x


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    # float: the vector; base64: its float32 little-endian bytes, base64-encoded
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tokenmill"
    max_model_len: int | None = None
    # what the model answers: "generate" (completions, chat) or "embedding" (/v1/embeddings);
    # None while it loads
    kind: Literal["generate", "embedding"] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class HealthStatus(BaseModel):
    status: Literal["ok"] = "ok"


class PrefixCacheReset(BaseModel):
    reset: bool


# -- the Batch API (tokenmill.server.batches) ---------------------------------------------


class BatchCreateRequest(_Request):
    input_file_id: Annotated[str, Field(min_length=1, max_length=128)]
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"] = "24h"
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
