"""Speech normalisation: numbers, money, dates, times and maths read aloud in English and Chinese."""

from __future__ import annotations

import pytest

from dialogue import detect_language, normalize_for_speech
from dialogue.normalize import LanguageError
from dialogue.numbers import en_cardinal, en_ordinal, en_year, zh_cardinal


def en(text: str) -> str:
    return normalize_for_speech(text, "en")


def zh(text: str) -> str:
    return normalize_for_speech(text, "zh")


def test_detect_language() -> None:
    assert detect_language("Hello there") == "en"
    assert detect_language("你好") == "zh"
    assert detect_language("我用 Python") == "zh"  # mixed counts as Chinese
    assert detect_language("3.14 = π") == "en"
    assert detect_language("こんにちは") == "en"  # kana only: not Chinese


def test_unknown_language_is_a_clear_error() -> None:
    with pytest.raises(LanguageError) as info:
        normalize_for_speech("hi", "fr")
    assert info.value.field == "language" and "'fr'" in str(info.value) and "en" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (13, "thirteen"),
        (42, "forty-two"),
        (100, "one hundred"),
        (1005, "one thousand five"),
        (1234567, "one million two hundred thirty-four thousand five hundred sixty-seven"),
        (-7, "minus seven"),
    ],
)
def test_en_cardinal(n: int, words: str) -> None:
    assert en_cardinal(n) == words


def test_en_ordinal_and_year() -> None:
    assert [en_ordinal(n) for n in (1, 2, 3, 12, 20, 21, 100)] == [
        "first",
        "second",
        "third",
        "twelfth",
        "twentieth",
        "twenty-first",
        "one hundredth",
    ]
    assert en_year(1905) == "nineteen oh five"
    assert en_year(2024) == "twenty twenty-four"
    assert en_year(2005) == "two thousand five"
    assert en_year(1900) == "nineteen hundred"


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "零"),
        (10, "十"),
        (15, "十五"),
        (110, "一百一十"),
        (1005, "一千零五"),
        (2000, "两千"),
        (10050, "一万零五十"),
        (12000, "一万两千"),
        (20000, "两万"),
        (100000, "十万"),
        (1000001, "一百万零一"),
        (100010000, "一亿零一万"),
        (-3, "负三"),
    ],
)
def test_zh_cardinal(n: int, words: str) -> None:
    assert zh_cardinal(n) == words


@pytest.mark.parametrize(
    ("text", "speech"),
    [
        ("I have 3 apples.", "I have three apples."),
        ("It is -5 outside.", "It is minus five outside."),
        ("Pi is 3.14.", "Pi is three point one four."),
        ("We grew 50% and then 3.5%.", "We grew fifty percent and then three point five percent."),
        ("It costs $3.50.", "It costs three dollars and fifty cents."),
        ("$1 or $0.99", "one dollar or ninety-nine cents"),
        ("$1,234,567", "one million two hundred thirty-four thousand five hundred sixty-seven dollars"),
        ("€5, £2.50 and ¥100", "five euros, two pounds and fifty pence and one hundred yen"),
        ("a $5 million deal", "a five million dollars deal"),
        ("I paid $5 and $10", "I paid five dollars and ten dollars"),
        ("He came 1st, she 2nd, then 23rd.", "He came first, she second, then twenty-third."),
        ("On 2024-05-01 we met.", "On May first, twenty twenty-four we met."),
        ("Due 5/1/2024.", "Due May first, twenty twenty-four."),
        ("Born May 3, 1990.", "Born May third, nineteen ninety."),
        ("In 1999 it began.", "In nineteen ninety-nine it began."),
        ("the 1990s and the 80s", "the nineteen nineties and the eighties"),
        ("Meet at 14:30.", "Meet at fourteen thirty."),
        ("At 9:05 or 10:00", "At nine oh five or ten o'clock"),
        ("Call at 7pm.", "Call at seven p m."),
        ("It ended 3:2.", "It ended three to two."),
        ("Pages 10-20", "Pages ten to twenty"),
        ("5 - 3 = 2", "five minus three equals two"),
        ("1 + 1 = 2", "one plus one equals two"),
        ("3/4 of us", "three quarters of us"),
        ("It's 25°C", "It's twenty-five degrees Celsius"),
        ("COVID-19 and GPT-4", "COVID nineteen and GPT four"),
        ("version 1.2.3", "version one point two point three"),
        ("agent 007", "agent zero zero seven"),
        ("#1 hit", "number one hit"),
        ("Tom & Jerry", "Tom and Jerry"),
        ("I ❤️ you 😀!", "I you!"),
        ("very *important* stuff", "very important stuff"),
        ("C++ is fun", "C++ is fun"),
        ("Wait… what?", "Wait… what?"),
    ],
)
def test_english(text: str, speech: str) -> None:
    assert en(text) == speech


@pytest.mark.parametrize(
    ("text", "speech"),
    [
        ("$x^2$", "x squared"),
        ("$x^3 + y^{10}$", "x cubed plus y to the power of ten"),
        (r"$\frac{a}{b}$", "a over b"),
        (r"$\frac{1}{2}$", "one half"),
        (r"\sqrt{x} and \sqrt[3]{8}", "the square root of x and the cube root of eight"),
        (r"$\alpha + \beta = \gamma$", "alpha plus beta equals gamma"),
        ("α and β", "alpha and beta"),
        ("2π r", "two pi r"),
        (r"$a \times b \le c$", "a times b is less than or equal to c"),
        ("$x > -1$", "x is greater than negative one"),
        ("x^2 + y^2 = r^2", "x squared plus y squared equals r squared"),
        ("E = mc²", "E equals m c squared"),
        ("√2 ≈ 1.414", "the square root of two is approximately equal to one point four one four"),
        (r"$e^{i\pi} + 1 = 0$", "e to the power of i pi plus one equals zero"),
        ("$n!$", "n factorial"),
    ],
)
def test_english_maths(text: str, speech: str) -> None:
    assert en(text) == speech


@pytest.mark.parametrize(
    ("text", "speech"),
    [
        ("3.5", "三点五"),
        ("0.5", "零点五"),
        ("50%的人", "百分之五十的人"),
        ("增长了-3.5%", "增长了负百分之三点五"),
        ("2024年", "二零二四年"),
        ("2024年5月1日", "二零二四年五月一日"),
        ("今天是2024-05-01", "今天是二零二四年五月一日"),
        ("下午14:30开会", "下午十四点三十分开会"),
        ("2:05出发", "两点零五分出发"),
        ("比分3:2", "比分三比二"),
        ("我有2个苹果，第2个坏了", "我有两个苹果，第二个坏了"),
        ("一共10000元", "一共一万元"),
        ("价格是$5或€3.5或¥100", "价格是五美元或三点五欧元或一百元"),
        ("温度-5°C", "温度零下五摄氏度"),
        ("10-20个人", "十到二十个人"),
        ("1/3的人", "三分之一的人"),
        ("用Python写了3个程序", "用Python写了三个程序"),
        ("iPhone 15很贵", "iPhone 十五很贵"),
        ("1,234", "一千二百三十四"),
        ("我❤️你", "我 你"),
    ],
)
def test_chinese(text: str, speech: str) -> None:
    assert zh(text) == speech


@pytest.mark.parametrize(
    ("text", "speech"),
    [
        ("$x^2$", "x的平方"),
        ("x^3", "x的立方"),
        ("$x^n$", "x的n次方"),
        (r"$\frac{1}{2}$", "二分之一"),
        (r"$\frac{a}{b}$", "b分之a"),
        (r"\sqrt{x}", "根号x"),
        (r"$\sqrt[3]{8}$", "三次根号八"),
        ("√2约等于1.414", "根号二约等于一点四一四"),
        (r"$\alpha + \beta$", "阿尔法加贝塔"),
        ("圆周率π约等于3.14", "圆周率派约等于三点一四"),
        ("x^2 + y^2 = r^2", "x的平方加y的平方等于r的平方"),
        ("x = -5", "x等于负五"),
        (r"$a \times b > c$", "a乘以b大于c"),
    ],
)
def test_chinese_maths(text: str, speech: str) -> None:
    assert zh(text) == speech


def test_plain_text_is_left_alone() -> None:
    for text in ("Hello, how are you?", "你好，今天天气真不错！", "It's a well-known fact - really."):
        language = detect_language(text)
        assert normalize_for_speech(text, language) == text


def test_full_width_digits_and_signs() -> None:
    assert zh("３．５％") == "百分之三点五"
    assert zh("１２３个") == "一百二十三个"


def test_long_digit_strings_are_read_digit_by_digit() -> None:
    assert en("12345678901234567890") == " ".join(["one two three four five six seven eight nine zero"] * 2)
    assert zh("00123") == "零零一二三"


def test_powers_of_words_and_brackets() -> None:
    assert en("area in meters^2") == "area in meters squared"
    assert en("(a+b)^2 = 9") == "(a plus b) squared equals nine"
    assert zh("(a+b)^2") == "(a加b)的平方"
    assert en("x^(n+1)") == "x to the power of n plus one"


def test_phone_like_numbers_are_read_digit_by_digit_but_round_numbers_are_not() -> None:
    assert en("Call 5551234567") == "Call five five five one two three four five six seven"
    assert zh("电话13812345678") == "电话一三八一二三四五六七八"
    assert en("1000000000 people") == "one billion people"


def test_two_is_liang_before_measure_words_only() -> None:
    assert zh("2个小时") == "两个小时"
    assert zh("2月2日") == "二月二日"
    assert zh("第2名") == "第二名"
    assert zh("22个") == "二十二个"
