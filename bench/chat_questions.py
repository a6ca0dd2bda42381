"""The question set the chat's system prompt and sampling are tuned on:
English and Chinese questions with checkable answers, and open questions
judged by written rules. `python -m bench chat_questions` scores each model.

A factual reply is right when it contains one of the accepted answers (case-
and width-insensitive; Chinese answers also accepted in traditional form,
since models sometimes write it). Every reply, factual or open, is also
judged by these rules:
- language: the reply is in the question's language (for a Chinese question
  at least half its letters are CJK characters; for an English one none are);
- speakable: no markdown (`*`, `#`, backticks, bullet lists), no URLs, no
  emoji, nothing a voice would have to spell out;
- short: at most 3 sentences and 60 words (English) or 120 characters
  (Chinese), and the model stopped by itself (not cut at the token limit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    language: str  # "en" | "zh"
    text: str
    #: Any one of these in the reply makes it right; empty: an open question.
    answers: tuple[str, ...] = ()


def q(language: str, text: str, *answers: str) -> Question:
    return Question(language, text, answers)


QUESTIONS: list[Question] = [
    # ---- English, one right answer ----------------------------------------
    q("en", "What is the capital of France?", "Paris"),
    q("en", "What is the capital of Japan?", "Tokyo"),
    q("en", "What is the capital of Italy?", "Rome"),
    q("en", "What is two plus three?", "5", "five"),
    q("en", "What is ten minus four?", "6", "six"),
    q("en", "What is three times four?", "12", "twelve"),
    q("en", "How many days are in a week?", "7", "seven"),
    q("en", "How many legs does a spider have?", "8", "eight"),
    q("en", "How many legs does a dog have?", "4", "four"),
    q("en", "How many months are in a year?", "12", "twelve"),
    q("en", "How many hours are in a day?", "24", "twenty-four", "twenty four"),
    q("en", "What color is the sky on a clear day?", "blue"),
    q("en", "What color is grass?", "green"),
    q("en", "What is the largest planet in our solar system?", "Jupiter"),
    q("en", "Which planet is known as the red planet?", "Mars"),
    q("en", "What is the boiling point of water in degrees Celsius?", "100"),
    q("en", "What is the freezing point of water in degrees Celsius?", "0", "zero"),
    q("en", "What do bees make?", "honey"),
    q("en", "What is the opposite of hot?", "cold"),
    q("en", "What is the chemical symbol for water?", "H2O", "H₂O"),
    q("en", "Which animal is known as the king of the jungle?", "lion"),
    q("en", "What is the largest ocean on Earth?", "Pacific"),
    q("en", "Who wrote Romeo and Juliet?", "Shakespeare"),
    q("en", "What language is mainly spoken in Brazil?", "Portuguese"),
    q("en", "In which country are the pyramids of Giza?", "Egypt"),
    q("en", "What is the first month of the year?", "January"),
    q("en", "How many continents are there?", "7", "seven"),
    q("en", "What gas do plants take in from the air?", "carbon dioxide", "CO2"),
    q("en", "What is the tallest mountain in the world?", "Everest"),
    q("en", "What is the currency of Japan?", "yen"),
    # ---- Chinese, one right answer ------------------------------------------
    q("zh", "中国的首都是哪里？", "北京"),
    q("zh", "法国的首都是哪里？", "巴黎"),
    q("zh", "日本的首都是哪里？", "东京", "東京"),
    q("zh", "二加三等于几？", "5", "五"),
    q("zh", "十减四等于几？", "6", "六"),
    q("zh", "三乘以四等于多少？", "12", "十二"),
    q("zh", "一个星期有几天？", "7", "七"),
    q("zh", "一年有几个月？", "12", "十二"),
    q("zh", "一天有多少个小时？", "24", "二十四"),
    q("zh", "蜘蛛有几条腿？", "8", "八"),
    q("zh", "狗有几条腿？", "4", "四"),
    q("zh", "晴天的时候天空是什么颜色？", "蓝"),
    q("zh", "草是什么颜色的？", "绿", "綠"),
    q("zh", "太阳系最大的行星是哪一颗？", "木星"),
    q("zh", "哪颗行星被称为红色星球？", "火星"),
    q("zh", "水在多少摄氏度沸腾？", "100", "一百"),
    q("zh", "蜜蜂会酿造什么？", "蜂蜜", "蜜"),
    q("zh", "热的反义词是什么？", "冷"),
    q("zh", "水的化学式是什么？", "H2O", "H₂O"),
    q("zh", "世界上最高的山峰是什么？", "珠穆朗玛", "珠峰", "Everest"),
    q("zh", "《红楼梦》的作者是谁？", "曹雪芹"),
    q("zh", "巴西人主要说什么语言？", "葡萄牙"),
    q("zh", "金字塔在哪个国家？", "埃及"),
    q("zh", "一年的第一个月是几月？", "一月", "1月"),
    q("zh", "世界上最大的海洋是什么？", "太平洋"),
    q("zh", "中国最长的河流是什么？", "长江", "長江"),
    q("zh", "熊猫最喜欢吃什么？", "竹"),
    q("zh", "日本的货币是什么？", "日元", "日圆", "円"),
    q("zh", "植物从空气中吸收什么气体？", "二氧化碳", "CO2"),
    q("zh", "中秋节一般吃什么？", "月饼", "月餅"),
    # ---- open questions: judged by the rules only ------------------------------
    q("en", "Hello! Who are you?"),
    q("en", "Can you recommend a good book for a long flight?"),
    q("en", "How can I sleep better at night?"),
    q("en", "Tell me something interesting about octopuses."),
    q("en", "What should I cook for dinner tonight?"),
    q("zh", "你好！你是谁？"),
    q("zh", "周末有什么好的放松方式？"),
    q("zh", "怎样才能睡得更好？"),
    q("zh", "给我讲一个关于大熊猫的有趣事实。"),
    q("zh", "今天晚饭吃什么好呢？"),
]

_TRADITIONAL = str.maketrans(
    "国东乐长龙马门时书说话语这们来为会还个发见", "國東樂長龍馬門時書說話語這們來為會還個發見"
)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_UNSPEAKABLE = re.compile(
    r"[*#`_|]|^\s*[-•]\s|^\s*\d+\.\s|https?://|www\.|[\U0001F300-\U0001FAFF\u2600-\u27BF]",
    re.MULTILINE,
)
_SENTENCE_END = re.compile(r"[.!?。！？]+")


def is_right(question: Question, reply: str) -> bool:
    folded = reply.casefold()
    for answer in question.answers:
        wanted = answer.casefold()
        if question.language == "en" and wanted.isalnum():
            # A whole word or number: "5" must not match "15", "four" not "fourteen".
            if re.search(rf"(?<![\w.]){re.escape(wanted)}(?![\w])", folded):
                return True
        elif wanted in folded or wanted.translate(_TRADITIONAL) in folded:
            return True
    return False


def language_ok(question: Question, reply: str) -> bool:
    cjk, latin = len(_CJK.findall(reply)), len(_LATIN.findall(reply))
    if question.language == "zh":
        # Formulas and names (H2O, CO2) are fine inside a Chinese reply.
        return cjk > 0 and cjk >= latin
    return cjk == 0


def speakable(reply: str) -> bool:
    return not _UNSPEAKABLE.search(reply)


def short(question: Question, reply: str, finished: bool) -> bool:
    sentences = [s for s in _SENTENCE_END.split(reply) if s.strip()]
    size_ok = (
        len(reply.split()) <= 60 if question.language == "en" else len(_CJK.findall(reply)) <= 120
    )
    return finished and len(sentences) <= 3 and size_ok
