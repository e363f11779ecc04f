"""Models: facts read from a model and its tokenizer (:mod:`.facts`), loading from folders, hub ids and GGUF
files (:mod:`.loading`), the prompt format recorded beside a model (:mod:`.info`), and cutting a student from
a model's blocks (:mod:`.shrink`)."""
