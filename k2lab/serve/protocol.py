"""The OpenAI request bodies the server accepts (pydantic), and OpenAI's error JSON.

Fields follow the OpenAI API reference; `top_k`, `stop_token_ids`, `chat_template_kwargs` and
`return_tokens_as_token_ids` are vLLM's extensions. No field is silently ignored: a field this server does not implement (unknown to it, or known to
OpenAI but unsupported here, e.g. `suffix`, `best_of`, `previous_response_id`) is a 400 that names it; a field
sent as null means "not set" (OpenAI's convention) and is accepted. Values out of range are a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from k2lab.serve.sampling import MAX_LOGPROBS, MAX_TOP_K


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        # OpenAI clients may send `"field": null` for parameters they leave unset; that asks for nothing
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            return {k: v for k, v in data.items() if v is not None or k in known}
        return data


class TextPart(Body):
    type: Literal["text"]
    text: str


class ImageURL(Body):
    url: Annotated[str, Field(min_length=1)]  # a data: URL (the server fetches nothing from the network)
    detail: Literal["auto"] | None = None  # images are read at the model's own resolution: no low/high


class ImagePart(Body):
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(Body):
    name: str
    arguments: str


class ToolCall(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^<>]+$")] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: ToolChoiceFunction


class JSONSchemaFormat(Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    schema_: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(Body):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=4)] | None


class Sampling(Body):
    """Sampling fields shared by chat and text completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] = 0
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: Stop = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=64)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id -> added to its logit
    user: str | None = None  # an end-user id for the operator's logs (OpenAI: abuse monitoring); logged


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    chat_template_kwargs: dict[str, bool] | None = None  # e.g. {"thinking": false}: passed to the chat renderer


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | \
        Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    # vLLM's: logprobs name tokens "token_id:N", so a client gets the ids themselves (RL: never re-tokenized)
    return_tokens_as_token_ids: bool = False


class UpdateWeightsFromDiskRequest(Body):
    """SGLang's POST /update_weights_from_disk body (k2lab.serve.weights); load_format only "auto"."""

    model_path: Annotated[str, Field(min_length=1)]
    load_format: Literal["auto"] | None = None
    abort_all_requests: bool = False


# ---- the Responses API (POST /v1/responses) -------------------------------------------------------------------
class InputText(Body):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None  # output_text from an earlier response (citations: none are produced here)
    logprobs: list | None = None


class InputImage(Body):
    type: Literal["input_image"]
    image_url: Annotated[str, Field(min_length=1)]  # a data: URL
    detail: Literal["auto"] | None = None  # images are read at the model's own resolution: no low/high


class InputMessage(Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText | InputImage]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Body):
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Body):
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None


class ReasoningText(Body):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(Body):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None  # what this server returned for include reasoning.encrypted_content
    status: str | None = None


def _item_type(item) -> str:
    # a message item may leave out its type (OpenAI's "easy input message")
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")


InputItem = Annotated[Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")] |
                      Annotated[FunctionCallOutputItem, Tag("function_call_output")] |
                      Annotated[ReasoningItem, Tag("reasoning")], Discriminator(_item_type)]


class ResponsesTool(Body):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ResponsesToolChoice(Body):
    type: Literal["function"]
    name: str


class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Body):
    format: TextFormat | None = None


class ReasoningConfig(Body):
    # effort "none" turns thinking off (the chat template's thinking=False); other efforts think as usual
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class ResponsesRequest(Body):
    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stream: bool = False
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, str] | None = None  # returned on the response object, as OpenAI does
    store: Literal[False] | None = None  # nothing is stored here: store=true (to fetch it later) is refused
    truncation: Literal["disabled"] | None = None
    include: list[Literal["reasoning.encrypted_content"]] | None = None
    user: str | None = None


class APIError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
