"""world_info encoding/decoding against DeepSpeed (golden/world_info_cases.json), both directions."""

from __future__ import annotations

import base64

import golden
import pytest
import vectors
from dslaunch.errors import WorldInfoError
from dslaunch.world_info import decode_world_info, encode_world_info

CASES = vectors.cases('world_info_cases.json')
DECODE_CASES = vectors.cases('world_info_cases.json', key='decode_cases')


@pytest.mark.parametrize('case', CASES, ids=golden.case_id)
def test_encode_is_byte_identical(case):
    encoded = encode_world_info(golden.ordered(case['input']))
    assert encoded == case['encoded']
    assert base64.urlsafe_b64decode(encoded).decode('utf-8') == case['json_text']


@pytest.mark.parametrize('case', CASES, ids=golden.case_id)
def test_decode_deepspeed_string(case):
    vectors.ordered_equal(decode_world_info(case['encoded']), case['decoded_by_launch_py'])


@pytest.mark.parametrize('case', [c for c in CASES if 'standard_b64_for_contrast' in c], ids=golden.case_id)
def test_decode_standard_alphabet_too(case):
    vectors.ordered_equal(decode_world_info(case['standard_b64_for_contrast']), case['decoded_by_launch_py'])


@pytest.mark.parametrize('case', DECODE_CASES, ids=golden.case_id)
def test_decode_edge_cases(case):
    if 'decoded_by_launch_py' in case:
        vectors.ordered_equal(decode_world_info(case['encoded']), case['decoded_by_launch_py'])
        return
    # Deviation: DeepSpeed raises binascii.Error/UnicodeDecodeError/JSONDecodeError tracebacks;
    # dslaunch raises one WorldInfoError line (and "None" gets launch.py's own message).
    with pytest.raises(WorldInfoError) as info:
        decode_world_info(case['encoded'])
    message = str(info.value)
    assert '\n' not in message
    if case['encoded'] == 'None':
        assert message == 'world_info can not be None'
    else:
        assert 'world_info' in message


@pytest.mark.parametrize(
    'garbage', ['', '!!!!', 'e30', 'W10=', 'IjEi', 'eyJhIjogMX0=', 'eyJhIjogW3RydWVdfQ==', 'gA==', 'ñ===']
)
def test_garbage_is_one_clear_error(garbage):
    # '' -> empty JSON, 'e30' -> bad padding, 'W10=' -> [], 'IjEi' -> "1", {"a": 1}, {"a": [true]}, 0x80, non-ASCII
    with pytest.raises(WorldInfoError):
        decode_world_info(garbage)


def test_uuid_slots_round_trip():
    info = {'localhost': ['GPU-8a3b', 'GPU-77c1']}
    assert decode_world_info(encode_world_info(info)) == info


@pytest.mark.parametrize(
    'payload',
    ['\ufeff{"a": [0]}'.encode(), '{"a": [0]}'.encode('utf-16'), '{"a": [0]}'.encode('utf-32-be')],
)
def test_decode_detects_the_json_encoding_like_launch_py(payload):
    # launch.py hands json.loads the decoded bytes, and json detects UTF-8 BOM and UTF-16/32
    assert decode_world_info(base64.urlsafe_b64encode(payload).decode()) == {'a': [0]}
