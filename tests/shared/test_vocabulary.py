"""The vocabulary is the one place names and limits live; the message set agrees with it."""

from shared import vocabulary as v
from shared.messages import BATCH_CLASSES, BATCH_TYPES, MessageType


def test_batch_kinds_name_the_batch_classes_in_wire_order():
    assert tuple(BATCH_CLASSES) == v.BATCH_KINDS
    assert [cls.TYPE for cls in BATCH_TYPES] == sorted(cls.TYPE for cls in BATCH_TYPES)
    assert {cls.KIND: cls.TYPE for cls in BATCH_TYPES} == {
        "report": MessageType.REPORT, "reuse": MessageType.REUSE, "inflate": MessageType.INFLATE,
        "deflate": MessageType.DEFLATE, "hint": MessageType.HINT}


def test_encodings_are_known_features_and_limits_are_consistent():
    assert set(v.ENCODINGS) <= set(v.KNOWN_FEATURES)
    assert len(set(v.KNOWN_FEATURES)) == len(v.KNOWN_FEATURES)
    assert v.PAGE_SIZE == 4096 == 1 << v.PAGE_SHIFT
    assert v.MAX_PFN == v.MAX_GUEST_PAGES - 1
    assert v.MAX_INLINE_COUNT == 4095
    assert v.SEED_BUFFER_WORDS * 8 == 32 * 1024
