"""Answer questions about a folder of .txt/.md notes, citing the file and characters of each answer.

    python examples/qa_folder.py ~/notes "Where did the first warehouse open?" "Who signed the lease?"

The folder is read once; a QASession keeps the documents' KV cache, so each further question costs
only its own tokens (when the notes fit the model's window; otherwise the best BM25 chunks are used
per question). Pass --extractive to get answers copied verbatim from the notes.
"""

import sys

import mlxllama
from mlxllama.qa import QASession, read_context


def main(argv):
    extractive = "--extractive" in argv
    args = [a for a in argv if a != "--extractive"]
    if len(args) < 2:
        sys.exit(__doc__)
    folder, questions = args[0], args[1:]
    docs = read_context([folder])  # Documents with their file paths; binary or empty files are refused
    model, tokenizer = mlxllama.load()  # the default model (SmolLM2-135M-Instruct), fetched on first use
    session = QASession(model, tokenizer, docs, extractive=extractive, max_context=2048)
    for question in questions:
        result = session.ask(question)
        print(f"Q: {question}")
        print(f"A: {result.answer}")
        if result.evidence:
            e = result.evidence
            print(f"   evidence: {e['source']} [{e['start']}:{e['end']}] {e['text']!r} (score {result.score:.2f})")
        print(f"   {result.prompt_tokens} prompt tokens processed, {result.seconds:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
