"""The endpoint panel's client snippets: the credential header each access mode needs, the
wake-up header only with scale-to-zero, and code that parses."""
from __future__ import annotations

import ast

import pytest

from hubdeploy.space.snippets import render_snippets

URL = "https://svc.example/endpoints/demo/v1"


@pytest.mark.parametrize("access,env", [("private", "HUBDEPLOY_API_KEY"), ("protected", "HUBDEPLOY_TOKEN"),
                                        ("public", None)])
@pytest.mark.parametrize("scale_to_zero_after_s", [0, 300])
def test_snippets_carry_what_the_endpoint_needs(access: str, env: str | None, scale_to_zero_after_s: int) -> None:
    s = render_snippets(URL + "/", "org/model", access, scale_to_zero_after_s)
    assert f"curl {URL}/chat/completions" in s["curl"]
    for code in (s["openai"], s["inference_client"]):
        ast.parse(code)
        assert f'"{URL}"' in code and '"org/model"' in code
    if env:
        assert f'-H "Authorization: Bearer ${env}"' in s["curl"] and f'export {env}="<' in s["curl"]
        assert f'os.environ["{env}"]' in s["openai"] and f'api_key=os.environ["{env}"]' in s["inference_client"]
    else:
        assert "Authorization" not in s["curl"] and "os.environ" not in s["openai"] + s["inference_client"]
    waits = scale_to_zero_after_s > 0
    assert ('-H "X-Scale-Up-Timeout: 120"' in s["curl"]) is waits
    assert ('default_headers={"X-Scale-Up-Timeout": "120"}' in s["openai"]) is waits
    assert ('headers={"X-Scale-Up-Timeout": "120"}' in s["inference_client"]) is waits
