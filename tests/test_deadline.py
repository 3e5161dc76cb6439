import time

import pytest

from moco_lightning.deadline import call_with_deadline


def test_returns_the_result_or_reraises_the_error_of_the_call():
    assert call_with_deadline(lambda: 41 + 1, 5.0, "adding") == 42
    with pytest.raises(ZeroDivisionError):
        call_with_deadline(lambda: 1 / 0, 5.0, "dividing")


@pytest.mark.timeout(30)
def test_a_call_past_its_deadline_is_a_timeout_naming_it():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^sleeping did not finish within 0.2 s"):
        call_with_deadline(lambda: time.sleep(3), 0.2, "sleeping")
    assert time.monotonic() - start < 2
