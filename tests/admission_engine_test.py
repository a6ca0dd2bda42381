"""Engine ring: the gateway's admission count on its own."""

from __future__ import annotations

import pytest

from gateway.admission import Admission
from services.common.errors import RETRY_AFTER_KEY, LimitExceeded, retry_trailers


def test_the_call_past_capacity_is_refused_with_a_retry_hint_and_a_slot_frees_on_exit() -> None:
    admission = Admission(capacity=2, retry_after_s=1.5)
    with admission.slot("converse"), admission.slot("ask"):
        assert admission.active == {"converse": 1, "ask": 1}
        with pytest.raises(LimitExceeded) as refused, admission.slot("converse"):
            pass
        assert "busy" in str(refused.value) and "Try again in 1.5 s" in str(refused.value)
        assert retry_trailers(refused.value) == ((RETRY_AFTER_KEY, "1500"),)
        assert admission.active == {"converse": 1, "ask": 1}  # the refused call held nothing
    assert admission.held == 0
    # A call that fails gives its slot back too.
    with pytest.raises(RuntimeError), admission.slot("converse"):
        raise RuntimeError("a turn failed")
    assert admission.held == 0


def test_a_limit_of_the_request_itself_carries_no_retry_hint() -> None:
    assert retry_trailers(LimitExceeded("The question audio is 90.0 s long.")) == ()
