"""Ready-to-paste client code for an endpoint (curl, `openai`, `InferenceClient`), from templates/snippets."""
from __future__ import annotations

from hubdeploy.hub_integration.badge import template_env

KEY_ENV = "HUBDEPLOY_API_KEY"
SNIPPETS = {"curl": "snippets/curl.sh.j2", "openai": "snippets/openai.py.j2",
            "inference_client": "snippets/inference_client.py.j2"}


def render_snippets(base_url: str, model: str, private: bool) -> dict[str, str]:
    """{"curl": ..., "openai": ..., "inference_client": ...} for `base_url` (the OpenAI `/v1` root).

    The key itself is never written into a snippet: they read it from $HUBDEPLOY_API_KEY, so
    a pasted snippet does not leak it into shell history or a notebook.
    """
    env = template_env()
    return {kind: env.get_template(path).render(base_url=base_url.rstrip("/"), model=model, private=private,
                                                key_env=KEY_ENV).rstrip() + "\n"
            for kind, path in SNIPPETS.items()}
