"""Generation from Python: load the default model (or a folder / repo id), stream a chat answer,
then run a small batch.

    python examples/generate_api.py [MODEL]
"""

import sys

import mlxllama


def main(model_path=None):
    model, tokenizer = mlxllama.load(model_path)
    messages = [{"role": "user", "content": "Give me three facts about the Moon."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    last = None
    for last in mlxllama.stream_generate(model, tokenizer, prompt, max_tokens=120, temp=0.7, top_p=0.9, seed=0):
        print(last.text, end="", flush=True)
    print(f"\n[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s, finish: {last.finish_reason}]")

    questions = ["What is 2 + 2?", "Name a primary colour."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True) for q in questions]
    for q, a in zip(questions, mlxllama.batch_generate(model, tokenizer, prompts, max_tokens=30)):
        print(f"{q} -> {a.strip()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
