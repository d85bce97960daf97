"""Hostfile parsing against DeepSpeed's ``fetch_hostfile`` (golden/hostfile_cases.json)."""

from __future__ import annotations

import golden
import pytest
import vectors
from dslaunch.errors import HostfileError
from dslaunch.hostfile import fetch_hostfile, parse_hostfile

CASES = vectors.cases('hostfile_cases.json')


def _hostfile_path(case, tmp_path):
    if case.get('text') is None:
        # No file written: a missing path, or (placeholder) a directory.
        return vectors.fill(case.get('path', str(tmp_path)), TMP=tmp_path, CWD=tmp_path)
    return vectors.write_exact(tmp_path / 'hostfile', case['text'])


@pytest.mark.parametrize('case', CASES, ids=golden.case_id)
def test_fetch_hostfile_matches_deepspeed(case, tmp_path):
    path = _hostfile_path(case, tmp_path)
    if 'error' in case:
        with pytest.raises(HostfileError) as info:
            fetch_hostfile(path)
        if vectors.builtin_type(case['error']['type']) is ValueError:
            vectors.assert_same_error(info.value, case['error'])
        else:
            # Deviation (docs/compatibility.md): DeepSpeed's own crash (e.g. UnicodeDecodeError)
            # becomes a HostfileError naming the file.
            assert str(path) in str(info.value)
        return
    result = fetch_hostfile(path)
    if case['result'] is None:
        assert result is None
    else:
        vectors.ordered_equal(result, case['result'])


@pytest.mark.parametrize('case', [c for c in CASES if c.get('text') is not None], ids=golden.case_id)
def test_parse_hostfile_text_agrees_with_file(case, tmp_path):
    """The in-memory parser splits lines exactly as reading the file does."""
    path = vectors.write_exact(tmp_path / 'hostfile', case['text'])
    try:
        from_file = fetch_hostfile(path)
    except HostfileError as exc:
        with pytest.raises(HostfileError) as info:
            parse_hostfile(case['text'])
        assert str(info.value) == str(exc)
        return
    assert parse_hostfile(case['text']) == from_file


def test_missing_and_directory_mean_no_hostfile(tmp_path, caplog):
    assert fetch_hostfile(tmp_path / 'absent') is None
    assert fetch_hostfile(tmp_path) is None
    assert 'absent' in caplog.text


def test_huge_slot_count_is_an_int(tmp_path):
    path = vectors.write_exact(tmp_path / 'hostfile', 'big slots=12345678901234567890\n')
    assert fetch_hostfile(path) == {'big': 12345678901234567890}


def test_not_utf8_is_a_hostfile_error(tmp_path):
    path = tmp_path / 'hostfile'
    path.write_bytes(b'w\xff slots=2\n')
    with pytest.raises(HostfileError, match='not valid UTF-8'):
        fetch_hostfile(path)


# Facts from DeepSpeed 0.19.8's fetch_hostfile, found by a differential run (not in the vectors).
@pytest.mark.parametrize(
    'text, expected',
    [
        # tabs are echoed as they are, like DeepSpeed (only line-breaking characters are escaped)
        ('worker-0\tgpu\tslots=4\n', 'Hostfile contains a bad entry: worker-0\tgpu\tslots=4, unable to proceed with launching'),
        ('w\x85 x\n', 'Hostfile contains a bad entry: w\\x85 x, unable to proceed with launching'),
        ('w slots=' + '9' * 5000 + '\n', 'Exceeds the limit (4300 digits) for integer string conversion'),
    ],
)
def test_error_text_keeps_deepspeeds_characters(text, expected):
    with pytest.raises(HostfileError) as info:
        parse_hostfile(text)
    assert str(info.value).startswith(expected)
    assert '\n' not in str(info.value)


def test_a_bom_is_part_of_the_first_host_name_as_in_deepspeed():
    assert parse_hostfile('\ufeffworker-0 slots=2\n') == {'\ufeffworker-0': 2}
