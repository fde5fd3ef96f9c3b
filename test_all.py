"""Tests for every part of llm-from-scratch: `pytest test_all.py`.

Hermetic: no network, nothing written into the repository (files go to pytest's tmp_path).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
INPUT = REPO / "input.txt"


# ---------------------------------------------------------------------------------------------
# input.txt: the Shakespeare corpus
# ---------------------------------------------------------------------------------------------

def test_input_txt_is_utf8_shakespeare_of_the_right_size():
    raw = INPUT.read_bytes()
    assert 0.9e6 <= len(raw) <= 1.3e6, f"input.txt is {len(raw)} bytes"
    text = raw.decode("utf-8")  # raises if not UTF-8
    assert "\r" not in text
    for word in ("MACBETH:", "OTHELLO:", "CORIOLANUS:", "BRUTUS:"):
        assert word in text


def test_input_txt_has_the_speaker_speech_layout():
    text = INPUT.read_text(encoding="utf-8")
    blocks = [b for b in text.split("\n\n") if b.strip()]
    speaker = re.compile(r"^[A-Z][A-Z .,'-]*:$")
    speeches = [b for b in blocks if speaker.match(b.split("\n")[0]) and "\n" in b]
    assert len(blocks) > 5000
    assert len(speeches) / len(blocks) > 0.7, "most blocks should be 'NAME:' then the speech"
    assert "Gutenberg" not in text and "\n\n\n" not in text
