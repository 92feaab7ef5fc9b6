"""The special-token strings every tokenizer, chat renderer and parser of this project names (one list)."""

EOD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
PAD_TOKEN = "<|pad|>"

# Harmony (GPT-OSS's chat format) tokens; every tokenizer kind carries them as single ids
START, CHANNEL, MESSAGE, END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"
RETURN, CALL, CONSTRAIN = "<|return|>", "<|call|>", "<|constrain|>"
HARMONY_TOKENS = (START, CHANNEL, MESSAGE, END, RETURN, CALL, CONSTRAIN)
# a tokenizer holding all of these as single tokens speaks Harmony (its chat prompts are rendered as Harmony)
HARMONY_MARKERS = (START, CHANNEL, MESSAGE, END, RETURN)
# an assistant turn ends with one of these: the final answer (return) or a tool call (call)
HARMONY_STOPS = (RETURN, CALL)

STUDENT_SPECIALS = (EOD_TOKEN, BOS_TOKEN, PAD_TOKEN) + HARMONY_TOKENS
