"""Talk to `mlxllama serve` with the official OpenAI Python client.

Start a server first (in another terminal):

    mlxllama serve                      # the default model on http://127.0.0.1:8080/v1
    mlxllama serve --model DIR --api-key secret

then run:

    pip install openai
    python examples/openai_client.py [--base-url http://127.0.0.1:8080/v1] [--api-key secret]
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default=os.environ.get("MLXLLAMA_API_KEY", "not-needed"),
                   help="the server's --api-key (any string when it has none)")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)

    model = client.models.list().data[0].id  # the one model the server runs
    print(f"model: {model}\n")

    # 1. A chat completion, whole.
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
    )
    print("chat:", reply.choices[0].message.content)
    print("usage:", reply.usage.prompt_tokens, "prompt +", reply.usage.completion_tokens, "completion tokens")
    print("finish_reason:", reply.choices[0].finish_reason, "\n")

    # 2. The same, streamed token by token, with the usage in a last chunk.
    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name three colours of the rainbow."}],
        max_tokens=48,
        temperature=0.7,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n({chunk.usage.completion_tokens} tokens)\n")

    # 3. A plain text completion with a stop sequence and the log-probabilities of each token.
    done = client.completions.create(model=model, prompt="One, two, three,", max_tokens=16, temperature=0,
                                     stop=["six"], logprobs=2)
    print("completion:", repr(done.choices[0].text), "finish_reason:", done.choices[0].finish_reason)
    lp = done.choices[0].logprobs
    for token, logprob, top in list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))[:5]:
        print(f"  {token!r:>10} {logprob:7.3f}   alternatives: {top}")


if __name__ == "__main__":
    main()
