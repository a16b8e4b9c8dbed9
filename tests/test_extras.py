import json

import pytest

from vitscope.errors import VitscopeError
from vitscope.extras import require


def test_an_installed_module_is_returned_and_a_missing_one_names_the_extra_that_installs_it():
    assert require("serve", "serving", "json") == [json]
    with pytest.raises(VitscopeError, match=r"serving needs the no_such_module_here package: "
                                            r"pip install 'vitscope\[serve\]'"):
        require("serve", "serving", "json", "no_such_module_here")
