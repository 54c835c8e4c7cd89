"""Simple maths and LaTeX read aloud, in English and in Chinese.

Covers what shows up in dialogue scripts: ``$x^2 + 1 = 5$``, ``\\frac{a}{b}``, ``\\sqrt[3]{8}``,
Greek letters (``\\alpha`` or ``α``), comparison and arithmetic operators, sub/superscripts,
``\\text{...}``, common functions. A small recursive reader walks the expression; it never fails:
anything it does not know is passed through as written (a command is read by its name).
"""

from __future__ import annotations

import logging
import re

from dialogue.numbers import en_decimal, en_fraction, en_ordinal, zh_decimal

logger = logging.getLogger(__name__)

# name -> (english, chinese); lowercase and uppercase Greek share a reading.
GREEK: dict[str, tuple[str, str]] = {
    "alpha": ("alpha", "阿尔法"),
    "beta": ("beta", "贝塔"),
    "gamma": ("gamma", "伽马"),
    "delta": ("delta", "德尔塔"),
    "epsilon": ("epsilon", "艾普西龙"),
    "zeta": ("zeta", "泽塔"),
    "eta": ("eta", "伊塔"),
    "theta": ("theta", "西塔"),
    "iota": ("iota", "约塔"),
    "kappa": ("kappa", "卡帕"),
    "lambda": ("lambda", "兰姆达"),
    "mu": ("mu", "缪"),
    "nu": ("nu", "纽"),
    "xi": ("xi", "克西"),
    "omicron": ("omicron", "奥密克戎"),
    "pi": ("pi", "派"),
    "rho": ("rho", "柔"),
    "sigma": ("sigma", "西格玛"),
    "tau": ("tau", "陶"),
    "upsilon": ("upsilon", "宇普西龙"),
    "phi": ("phi", "斐"),
    "chi": ("chi", "卡伊"),
    "psi": ("psi", "普赛"),
    "omega": ("omega", "欧米伽"),
}
_GREEK_LOWER = "αβγδεζηθικλμνξοπρστυφχψω"
_GREEK_UPPER = "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ"
GREEK_CHARS: dict[str, str] = {}
for _name, _lower, _upper in zip(GREEK, _GREEK_LOWER, _GREEK_UPPER, strict=True):
    GREEK_CHARS[_lower] = GREEK_CHARS[_upper] = _name
GREEK_CHARS.update({"ς": "sigma", "ϵ": "epsilon", "ϑ": "theta", "ϕ": "phi"})

# symbol name -> (english, chinese). Names are LaTeX command names where one exists.
OPERATORS: dict[str, tuple[str, str]] = {
    "=": ("equals", "等于"),
    "+": ("plus", "加"),
    "-": ("minus", "减"),
    "neg": ("negative", "负"),
    "<": ("is less than", "小于"),
    ">": ("is greater than", "大于"),
    "leq": ("is less than or equal to", "小于等于"),
    "geq": ("is greater than or equal to", "大于等于"),
    "neq": ("is not equal to", "不等于"),
    "approx": ("is approximately equal to", "约等于"),
    "equiv": ("is equivalent to", "恒等于"),
    "times": ("times", "乘以"),
    "div": ("divided by", "除以"),
    "pm": ("plus or minus", "正负"),
    "mp": ("minus or plus", "负正"),
    "infty": ("infinity", "无穷大"),
    "to": ("to", "趋向于"),
    "in": ("in", "属于"),
    "notin": ("not in", "不属于"),
    "subset": ("is a subset of", "包含于"),
    "cup": ("union", "并"),
    "cap": ("intersect", "交"),
    "forall": ("for all", "对任意"),
    "exists": ("there exists", "存在"),
    "partial": ("partial", "偏"),
    "nabla": ("nabla", "纳布拉"),
    "cdots": ("and so on", "等等"),
    "sum": ("the sum of", "求和"),
    "prod": ("the product of", "连乘"),
    "int": ("the integral of", "积分"),
    "lim": ("the limit of", "极限"),
    "sin": ("sine", "正弦"),
    "cos": ("cosine", "余弦"),
    "tan": ("tangent", "正切"),
    "log": ("log", "对数"),
    "ln": ("natural log", "自然对数"),
    "exp": ("exp", "指数"),
    "max": ("max", "最大值"),
    "min": ("min", "最小值"),
    "degree": ("degrees", "度"),
    "percent": ("percent", "百分之"),
    "factorial": ("factorial", "的阶乘"),
    "prime": ("prime", "撇"),
}
_OPERATOR_ALIASES = {
    "le": "leq",
    "ge": "geq",
    "ne": "neq",
    "leqslant": "leq",
    "geqslant": "geq",
    "lt": "<",
    "gt": ">",
    "cdot": "times",
    "ast": "times",
    "rightarrow": "to",
    "longrightarrow": "to",
    "ldots": "cdots",
    "dots": "cdots",
    "circ": "degree",
    "subseteq": "subset",
}
# Unicode maths symbols, also converted in plain text (they are never ambiguous).
SYMBOL_CHARS: dict[str, str] = {
    "≤": "leq",
    "≦": "leq",
    "≥": "geq",
    "≧": "geq",
    "≠": "neq",
    "≈": "approx",
    "≡": "equiv",
    "×": "times",
    "÷": "div",
    "±": "pm",
    "∓": "mp",
    "∞": "infty",
    "→": "to",
    "∈": "in",
    "∉": "notin",
    "∑": "sum",
    "∏": "prod",
    "∫": "int",
    "∂": "partial",
    "∇": "nabla",
    "…": "cdots",
    "⋯": "cdots",
    "∀": "forall",
    "∃": "exists",
}
# Commands whose argument is read as it is (fonts, text), or with a word around it.
_TEXT_COMMANDS = {
    "text",
    "textrm",
    "textbf",
    "textit",
    "mathrm",
    "mathbf",
    "mathit",
    "mathsf",
    "mathbb",
    "mathcal",
    "operatorname",
    "boldsymbol",
    "bm",
}
_ACCENTS: dict[str, tuple[str, str, bool]] = {  # name -> (english, chinese, word goes before the argument)
    "vec": ("vector", "向量", True),
    "hat": ("hat", "帽", False),
    "bar": ("bar", "拔", False),
    "overline": ("bar", "拔", False),
    "tilde": ("tilde", "波浪", False),
    "dot": ("dot", "点", False),
}
# Commands that only change layout: dropped.
_SILENT_COMMANDS = {
    "left",
    "right",
    "big",
    "Big",
    "bigg",
    "Bigg",
    "displaystyle",
    "textstyle",
    "quad",
    "qquad",
    "limits",
    "nolimits",
    "mathop",
}
# Multi-letter names read as words rather than letter by letter when they appear without a backslash.
_FUNCTION_WORDS = {"sin", "cos", "tan", "log", "ln", "exp", "lim", "max", "min"}

_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
_LETTERS_RE = re.compile(r"[A-Za-z]+")
_COMMAND_RE = re.compile(r"\\([A-Za-z]+|.|$)", re.DOTALL)  # a lone trailing backslash matches too


def op_word(name: str, language: str) -> str:
    """The reading of an operator or symbol name from OPERATORS in the given language."""
    en, zh = OPERATORS[name]
    return zh if language == "zh" else en


def greek_word(name: str, language: str) -> str:
    en, zh = GREEK[name]
    return zh if language == "zh" else en


def join_words(pieces: list[str], language: str) -> str:
    """Join spoken pieces: spaces in English; in Chinese only between two Latin words or numbers."""
    pieces = [p.strip() for p in pieces if p and p.strip()]
    if language != "zh":
        return " ".join(pieces)
    out = ""
    for piece in pieces:
        if out and out[-1].isascii() and out[-1].isalnum() and piece[0].isascii() and piece[0].isalnum():
            out += " "
        out += piece
    return out


def speak_math(expression: str, language: str) -> str:
    """Read a maths expression (LaTeX or plain, without the $ delimiters) as words.

    >>> speak_math(r"x^2 + \\frac{1}{2} = y", "en")
    'x squared plus one half equals y'
    >>> speak_math(r"x^2 + \\frac{1}{2} = y", "zh")
    'x的平方加二分之一等于y'
    """
    return join_words(_MathReader(expression, language).read_all(), language)


class _MathReader:
    """Recursive reader over one expression; every ``read_*`` returns a list of spoken pieces."""

    def __init__(self, source: str, language: str) -> None:
        self.src = source
        self.lang = language
        self.pos = 0

    # -- helpers
    def _peek(self) -> str:
        return self.src[self.pos] if self.pos < len(self.src) else ""

    def _skip_space(self) -> None:
        while self.pos < len(self.src) and self.src[self.pos].isspace():
            self.pos += 1

    def _word(self, name: str) -> str:
        return op_word(name, self.lang)

    def _number(self, digits: str) -> str:
        return zh_decimal(digits) if self.lang == "zh" else en_decimal(digits)

    def _read_group_text(self, opening: str = "{", closing: str = "}") -> str:
        """Raw text of a {...} group at pos (pos is on the opening bracket); nested groups kept."""
        depth = 0
        start = self.pos
        while self.pos < len(self.src):
            ch = self.src[self.pos]
            self.pos += 1
            if ch == opening:
                depth += 1
            elif ch == closing:
                depth -= 1
                if depth == 0:
                    return self.src[start + 1 : self.pos - 1]
        return self.src[start + 1 :]  # unbalanced: read to the end

    def _read_argument_text(self) -> str:
        """One argument as raw text: a {group}, a command, a number run, or one character."""
        self._skip_space()
        ch = self._peek()
        if not ch:
            return ""
        if ch == "{":
            return self._read_group_text()
        if ch == "(":
            return self._read_group_text("(", ")")
        if ch == "\\":
            match = _COMMAND_RE.match(self.src, self.pos)
            assert match is not None
            self.pos = match.end()
            return match.group(0)
        if ch == "-" and self.pos + 1 < len(self.src) and self.src[self.pos + 1].isdigit():
            match = _NUMBER_RE.match(self.src, self.pos + 1)
            assert match is not None
            self.pos = match.end()
            return "-" + match.group(0)
        if ch.isdigit():
            # A digit run rather than TeX's single digit: people write x^10 meaning x to the tenth.
            match = _NUMBER_RE.match(self.src, self.pos)
            assert match is not None
            self.pos = match.end()
            return match.group(0)
        self.pos += 1
        return ch

    def _sub(self, text: str) -> list[str]:
        return _MathReader(text, self.lang).read_all()

    # -- grammar
    def read_all(self) -> list[str]:
        pieces: list[str] = []
        while True:
            self._skip_space()
            if self.pos >= len(self.src):
                return pieces
            pieces.extend(self._read_item(pieces))

    def _read_item(self, before: list[str]) -> list[str]:
        atom = self._read_atom(before)
        while True:
            self._skip_space()
            ch = self._peek()
            if ch == "^":
                self.pos += 1
                atom = self._power(atom, self._read_argument_text())
            elif ch == "_":
                self.pos += 1
                sub = self._sub(self._read_argument_text())
                atom = [*atom, "sub", *sub] if self.lang != "zh" else [*atom, *sub]
            elif ch == "!" and self.src[self.pos : self.pos + 2] != "!=":
                self.pos += 1
                atom = [*atom, self._word("factorial")]
            elif ch == "'":
                self.pos += 1
                atom = [*atom, self._word("prime")]
            elif ch == "%" or self.src.startswith("\\%", self.pos):
                self.pos += 1 if ch == "%" else 2
                atom = [self._word("percent"), *atom] if self.lang == "zh" else [*atom, "percent"]
            else:
                return atom

    def _power(self, base: list[str], exponent: str) -> list[str]:
        exp = exponent.strip()
        if exp in ("\\circ", "circ"):
            return [*base, self._word("degree")]
        if exp in ("\\prime", "'"):
            return [*base, self._word("prime")]
        if self.lang == "zh":
            if exp == "2":
                return [*base, "的平方"]
            if exp == "3":
                return [*base, "的立方"]
            return [*base, "的", *self._sub(exp), "次方"]
        if exp == "2":
            return [*base, "squared"]
        if exp == "3":
            return [*base, "cubed"]
        return [*base, "to the power of", *self._sub(exp)]

    def _read_atom(self, before: list[str]) -> list[str]:
        ch = self._peek()
        if ch == "{":
            return self._sub(self._read_group_text())
        if ch == "\\":
            return self._read_command()
        if ch.isdigit():
            match = _NUMBER_RE.match(self.src, self.pos)
            assert match is not None
            self.pos = match.end()
            return [self._number(match.group(0))]
        if ch.isascii() and ch.isalpha():
            match = _LETTERS_RE.match(self.src, self.pos)
            assert match is not None
            self.pos = match.end()
            letters = match.group(0)
            if letters in _FUNCTION_WORDS:
                return [self._word(letters)]
            # "xy" is x times y; a long run is a word someone typed (e.g. "if", "and").
            return list(letters) if len(letters) <= 3 else [letters]
        self.pos += 1
        if ch == "√":
            return self._root_words("", self._sub(self._read_argument_text()))
        if ch in GREEK_CHARS:
            return [greek_word(GREEK_CHARS[ch], self.lang)]
        if ch in SYMBOL_CHARS:
            return [self._word(SYMBOL_CHARS[ch])]
        if ch == "-":
            # A sign when nothing to operate on precedes it (start, after an operator or an opening bracket).
            unary = not before or before[-1] in self._binary_words()
            return [self._word("neg" if unary else "-")]
        if ch in "=+<>":
            if self._peek() == "=" and ch in "<>":
                self.pos += 1
                return [self._word("leq" if ch == "<" else "geq")]
            return [self._word(ch)]
        if ch == "!" and self._peek() == "=":
            self.pos += 1
            return [self._word("neq")]
        if ch in "*·":
            return [self._word("times")]
        if ch == "/":
            return [self._word("div")]
        if ch in "()[]|{}&~":
            # Brackets are not spoken: the grouping is carried by the TTS phrasing, not by words.
            return []
        return [ch]

    def _binary_words(self) -> set[str]:
        names = ("=", "+", "-", "neg", "<", ">", "leq", "geq", "neq", "approx", "times", "div", "pm", "to")
        return {self._word(name) for name in names}

    def _read_command(self) -> list[str]:
        match = _COMMAND_RE.match(self.src, self.pos)
        assert match is not None
        self.pos = match.end()
        name = match.group(1)
        if not name.isalpha():  # \, \; \{ \% ...
            if name == "%":
                return ["percent"] if self.lang != "zh" else [self._word("percent")]
            return []
        if name in ("frac", "dfrac", "tfrac", "cfrac"):
            return self._fraction(self._read_argument_text(), self._read_argument_text())
        if name == "sqrt":
            return self._root()
        if name in _TEXT_COMMANDS:
            return [self._read_argument_text()]
        if name in _ACCENTS:
            en, zh, before = _ACCENTS[name]
            word = zh if self.lang == "zh" else en
            arg = self._sub(self._read_argument_text())
            return [word, *arg] if before else [*arg, word]
        if name in _SILENT_COMMANDS:
            return []
        base = name[3:] if name.startswith("var") and name[3:] in GREEK else name
        if base.lower() in GREEK:
            return [greek_word(base.lower(), self.lang)]
        name = _OPERATOR_ALIASES.get(name, name)
        if name in OPERATORS:
            return [self._word(name)]
        return [name]  # unknown command: its name is the best guess at how it is read

    def _fraction(self, numerator: str, denominator: str) -> list[str]:
        num, den = numerator.strip(), denominator.strip()
        if self.lang == "zh":
            return [*self._sub(den), "分之", *self._sub(num)]
        if num.isdigit() and den.isdigit() and len(num) < 6 and len(den) < 6:
            return [en_fraction(int(num), int(den))]
        return [*self._sub(num), "over", *self._sub(den)]

    def _root(self) -> list[str]:
        self._skip_space()
        index = ""
        if self._peek() == "[":
            end = self.src.find("]", self.pos)
            if end != -1:
                index = self.src[self.pos + 1 : end].strip()
                self.pos = end + 1
        return self._root_words(index, self._sub(self._read_argument_text()))

    def _root_words(self, index: str, radicand: list[str]) -> list[str]:
        if self.lang == "zh":
            if not index or index == "2":
                return ["根号", *radicand]
            return [*self._sub(index), "次根号", *radicand]
        if not index or index == "2":
            return ["the square root of", *radicand]
        if index == "3":
            return ["the cube root of", *radicand]
        if index.isdigit():
            return [f"the {en_ordinal(int(index))} root of", *radicand]
        return ["the", *self._sub(index), "th root of", *radicand]
