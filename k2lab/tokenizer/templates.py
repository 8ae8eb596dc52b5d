"""The Jinja chat templates k2lab writes into `tokenizer_config.json` (and `chat_template.jinja`), one per chat
format. `k2lab.tokenizer.chat` renders the same strings in Python; tests check that the two agree through
transformers' `apply_chat_template`.

Both templates name a tool call that has no id `functions.{name}:{n}`, n counting the calls of the whole
conversation (so ids stay unique across turns), and write `<|` in tool-call arguments as `\\u003c|` (the same JSON
value) so that an argument cannot spell a marker. The K2.6 template renders a null reasoning_content as empty
(Moonshot's prints it as "None").
"""

K2_6, K2_INSTRUCT = "k2.6", "k2-instruct"
MEDIA = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"


def _text(media: str) -> str:
    return r"""{%- macro text(c) -%}
{%- if c is string -%}{{ c }}{%- elif c is not none -%}{%- for p in c -%}
{%- if p['type'] == 'image_url' -%}""" + media + r"""{%- else -%}{{ p['text'] }}{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(calls=0, last=-1) -%}
"""


_ROLE = r"""{%- if m['role'] == 'user' -%}<|im_user|>
{%- elif m['role'] == 'assistant' -%}<|im_assistant|>
{%- else -%}<|im_system|>
{%- endif -%}
{{ m.get('name') or m['role'] }}<|im_middle|>"""

_CALLS = r"""{%- if m.get('tool_calls') -%}<|tool_calls_section_begin|>
{%- for tc in m['tool_calls'] -%}
{%- set args = tc['function']['arguments'] -%}
{%- set args = (args if args is string else args | tojson) | replace('<|', '\\u003c|') -%}
<|tool_call_begin|>{{ tc.get('id') or 'functions.' ~ tc['function']['name'] ~ ':' ~ (ns.calls + loop.index0) }}
{{- '<|tool_call_argument_begin|>' }}{{ args }}<|tool_call_end|>
{%- endfor -%}<|tool_calls_section_end|>
{%- set ns.calls = ns.calls + m['tool_calls'] | length -%}
{%- endif -%}"""

_OTHER = r"""{%- elif m['role'] == 'tool' -%}## Return of {{ m['tool_call_id'] }}
{{ text(m.get('content')) }}
{%- else -%}{{ text(m.get('content')) }}
{%- endif -%}<|im_end|>
{%- endfor -%}"""

# K2-Instruct (0711/0905): JSON tool declarations, a default system turn, no think block in the prompt.
K2_INSTRUCT_TEMPLATE = _text(MEDIA) + r"""{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- for m in messages -%}
{%- if loop.first and m['role'] != 'system' -%}
<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}
""" + _ROLE + r"""
{%- if m['role'] == 'assistant' -%}
{%- if m.get('reasoning_content') is not none -%}<think>{{ m['reasoning_content'] }}</think>{%- endif -%}
{{ text(m.get('content')) }}
""" + _CALLS + _OTHER + r"""
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"""

# K2.5/K2.6: TypeScript-style tool declarations (`tools_ts_str`, computed by the tokenizer; compact JSON without
# it), a think block in every assistant turn, reasoning dropped up to the last assistant message without tool
# calls unless preserve_thinking, generation prompt ending `<think>` (or `<think></think>` with thinking=false),
# a newline after each image.
K2_6_TEMPLATE = _text(MEDIA + r"{{ '\n' }}") + r"""
{%- set preserve = preserve_thinking is defined and preserve_thinking -%}
{%- set no_think = thinking is defined and thinking is false -%}
{%- if not preserve -%}{%- for m in messages -%}
{%- if m['role'] == 'assistant' and not m.get('tool_calls') -%}{%- set ns.last = loop.index0 -%}{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- if tools -%}<|im_system|>tool_declare<|im_middle|>
{%- if tools_ts_str is defined and tools_ts_str -%}{{ tools_ts_str }}
{%- else -%}{{ tools | tojson(separators=(',', ':')) }}{%- endif -%}<|im_end|>
{%- endif -%}
{%- for m in messages -%}
""" + _ROLE + r"""
{%- if m['role'] == 'assistant' -%}
{%- if loop.index0 <= ns.last or (no_think and not preserve) -%}<think></think>
{%- else -%}<think>{{ m.get('reasoning_content') or '' }}</think>{%- endif -%}
{{ text(m.get('content')) }}
""" + _CALLS + _OTHER + r"""
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>
{%- if no_think -%}<think></think>{%- else -%}<think>{%- endif -%}
{%- endif -%}"""

CHAT_FORMATS = {K2_6: K2_6_TEMPLATE, K2_INSTRUCT: K2_INSTRUCT_TEMPLATE}


def check_format(chat_format: str) -> str:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {chat_format!r}: use one of {sorted(CHAT_FORMATS)}")
    return chat_format


def chat_format_of(config: dict) -> str:
    """The chat format of a tokenizer_config.json: its `k2lab_chat_format` when k2lab wrote it; else "k2.6" for
    a template that uses Moonshot's K2.5/K2.6 variables (or no template), "k2-instruct" for any other template."""
    if "k2lab_chat_format" in config:
        try:
            return check_format(config["k2lab_chat_format"])
        except ValueError as e:
            raise ValueError(f"tokenizer_config.json k2lab_chat_format: {e}") from None
    template = config.get("chat_template")
    if not isinstance(template, str) or "tools_ts_str" in template or "preserve_thinking" in template:
        return K2_6
    return K2_INSTRUCT
