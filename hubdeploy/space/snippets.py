"""Ready-to-paste client code for an endpoint (curl, `openai`, `InferenceClient`), from templates/snippets."""
from __future__ import annotations

from hubdeploy.hub_integration.badge import template_env
from hubdeploy.space.client import TOKEN_ENV

KEY_ENV = "HUBDEPLOY_API_KEY"
SNIPPETS = {"curl": "snippets/curl.sh.j2", "openai": "snippets/openai.py.j2",
            "inference_client": "snippets/inference_client.py.j2"}
# per access mode: the variable the credential is read from, what it is, and where it comes from
_CREDENTIAL = {
    "private": (KEY_ENV, "your API key", "The endpoint's own API key, shown once when it was created."),
    "protected": (TOKEN_ENV, "the deploy service's admin token",
                  "A protected endpoint takes a credential of the deploy service (its admin token)."),
}


def render_snippets(base_url: str, model: str, access: str = "private",
                    scale_to_zero_after_s: int = 0) -> dict[str, str]:
    """{"curl": ..., "openai": ..., "inference_client": ...} for `base_url` (the OpenAI `/v1` root).

    A private or protected endpoint's snippets send `Authorization: Bearer` with the credential
    that endpoint needs; the credential itself is never written into a snippet: they read it from
    an environment variable, so a pasted snippet does not leak it into shell history or a notebook.
    With scale-to-zero on they send `X-Scale-Up-Timeout`, so a sleeping endpoint is waited for
    instead of answering 503.
    """
    key_env, key_what, key_hint = _CREDENTIAL.get(access, (None, None, None))
    env = template_env()
    return {kind: env.get_template(path).render(base_url=base_url.rstrip("/"), model=model, key_env=key_env,
                                                key_what=key_what, key_hint=key_hint,
                                                scale_up=scale_to_zero_after_s > 0).rstrip() + "\n"
            for kind, path in SNIPPETS.items()}
