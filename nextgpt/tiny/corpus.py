"""The text the tiny LLM is pre-trained on: an embedded English corpus (a small grammar of
sentences about shapes, sounds and motion) and caption turns of the synthetic data set's grammar."""

from __future__ import annotations

import random

from nextgpt.world import synthetic as syn

# --------------------------------------------------------------------------------------------------------
# Embedded English corpus
# --------------------------------------------------------------------------------------------------------

_COLOURS = (
    "red green blue yellow orange purple pink white black grey gray brown cyan magenta violet "
    "gold silver teal navy beige maroon olive turquoise crimson"
).split()
_SHAPES = (
    "circle square triangle rectangle star heart diamond ellipse oval hexagon pentagon octagon cross "
    "line dot ring cube sphere ball box arrow spiral cylinder cone pyramid disc blob stripe grid"
).split()
_SIZES = "small large big tiny huge medium little giant thin thick wide narrow tall short".split()
_VPOS = "top bottom upper lower middle centre center".split()
_HPOS = "left right centre center middle".split()
_DIRECTIONS = "left right up down upwards downwards forward backward across around diagonally".split()
_MOTIONS = (
    "moving moves move sliding slides rotating rotates spinning spins bouncing bounces falling falls "
    "rising rises drifting drifts shrinking shrinks growing grows flashing flashes jumping jumps"
).split()
_SPEEDS = "slowly quickly fast steadily smoothly gradually suddenly".split()
_PITCH = "high low medium rising falling".split()
_LOUDNESS = "loud quiet soft faint gentle sharp steady".split()
_SOUNDS = (
    "tone beep beeping beeps hum humming buzz buzzing whistle whistling chirp chirping click clicking "
    "ring ringing chime chimes noise sound sounds siren bell drum note melody rhythm pulse pulses static"
).split()
_NUMBERS = "one two three four five six seven eight nine ten".split()
_MEDIA = (
    "image picture photo photograph drawing video clip movie animation audio recording sound track".split()
)
_BACKGROUNDS = "white black grey dark light plain blank empty coloured colored striped".split()
_FUNCTION_WORDS = (
    "the a an of in on at to with and or but not no yes is are was were be been being it its this that "
    "these those there here which what where when who whom whose why how has have had do does did can could "
    "will would should shall may might must i you he she we they me him her us them my your his our their "
    "for from by as into onto over under above below between behind beside near far next then than so "
    "very too also just only some any all each every both few many much more most other another such same "
    "if because while after before during until about against through without within along again once "
    "now still already always never often sometimes please thank thanks sure okay well"
).split()
_VERBS = (
    "show shows shown showing generate generates generated create creates draw draws make makes give gives "
    "see sees hear hears listen watch describe describes describing tell tells explain play plays produce "
    "produces contains contain appears appear looks look sounds sound is happens depicts depict asked ask "
    "want wants like likes need needs help helps write writes answer answers caption captions"
).split()
_NOUNS = (
    "object objects shape shapes colour colours color colors position size background foreground scene "
    "frame frames second seconds moment time world people person man woman child dog cat bird car tree "
    "house water sky sun light music voice speech room street city field table window door question answer "
    "instruction request example description caption user assistant human model"
).split()
_ADJECTIVES = (
    "bright dark clear simple plain beautiful nice good bad new old first last next single double same "
    "different random empty full happy calm noisy silent smooth rough round sharp solid hollow"
).split()

_INSTRUCTIONS = (
    "Generate an image of {obj}.",
    "Please show me {obj}.",
    "Can you draw {obj}?",
    "Create a video of {obj} {motion}.",
    "Make a short video where {obj} is {motion}.",
    "Produce the sound of {snd}.",
    "Generate audio of {snd}.",
    "What is in this image?",
    "Describe this image.",
    "Describe the video.",
    "What do you hear in this audio?",
    "What sound is this?",
    "Tell me what happens in the video.",
    "Where is the {colour} {shape}?",
    "What colour is the {shape}?",
    "How many shapes are there?",
)
_ANSWERS = (
    "Sure thing! Here is {obj}.",
    "Sure! Here is the image you asked for.",
    "Here is a video of {obj} {motion}.",
    "Here is the audio: {snd}.",
    "The image shows {obj}.",
    "It shows {obj} on a {bg} background.",
    "The video shows {obj} {motion}.",
    "This is {snd}.",
    "I can hear {snd}.",
    "The {shape} is at the {vpos} {hpos}.",
    "The {shape} is {colour}.",
    "There are {num} shapes.",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def tiny_corpus(seed: int = 0, n_sentences: int = 4000) -> list[str]:
    """A small deterministic English corpus about shapes, colours, motion and sounds.

    Why: the tiny tokenizers must really tokenize the project's synthetic captions and the Vicuna
    prompt template into sensible subwords (not bytes), and must be trainable offline.
    """
    rng = random.Random(seed)
    pick = rng.choice

    def obj() -> str:
        size = pick(_SIZES) + " " if rng.random() < 0.5 else ""
        colour = pick(_COLOURS)
        first = size or colour
        phrase = f"{_article(first)} {size}{colour} {pick(_SHAPES)}"
        r = rng.random()
        if r < 0.4:
            phrase += f" at the {pick(_VPOS)} {pick(_HPOS)}"
        elif r < 0.6:
            phrase += f" in the {pick(_VPOS)}"
        elif r < 0.7:
            phrase += f" on the {pick(_HPOS)}"
        return phrase

    def motion() -> str:
        return f"{pick(_MOTIONS)} {pick(_DIRECTIONS)}" + (f" {pick(_SPEEDS)}" if rng.random() < 0.4 else "")

    def snd() -> str:
        r = rng.random()
        if r < 0.4:
            p = pick(_PITCH)
            return f"{_article(p)} {p} pitched {pick(_SOUNDS)}"
        if r < 0.7:
            loud = pick(_LOUDNESS)
            return f"{_article(loud)} {loud} {pick(_SOUNDS)} for {pick(_NUMBERS)} seconds"
        return f"{pick(_SOUNDS)} {pick(_SOUNDS)} with {pick(_LOUDNESS)} {pick(_SOUNDS)}"

    def fill(template: str) -> str:
        return template.format(
            obj=obj(),
            motion=motion(),
            snd=snd(),
            colour=pick(_COLOURS),
            shape=pick(_SHAPES),
            vpos=pick(_VPOS),
            hpos=pick(_HPOS),
            num=pick(_NUMBERS),
            bg=pick(_BACKGROUNDS),
        )

    def filler() -> str:
        words = [pick(_FUNCTION_WORDS), pick(_VERBS), pick(_FUNCTION_WORDS), pick(_ADJECTIVES), pick(_NOUNS)]
        if rng.random() < 0.5:
            words += [pick(_FUNCTION_WORDS), pick(_NOUNS)]
        s = " ".join(words)
        return s[0].upper() + s[1:] + pick([".", ".", "?", "!", ","])

    out: list[str] = []
    # every vocabulary word at least once, in several casings, so no word is left to bytes
    vocab_words = sorted(
        set(
            _COLOURS
            + _SHAPES
            + _SIZES
            + _VPOS
            + _HPOS
            + _DIRECTIONS
            + _MOTIONS
            + _SPEEDS
            + _PITCH
            + _LOUDNESS
            + _SOUNDS
            + _NUMBERS
            + _MEDIA
            + _BACKGROUNDS
            + _FUNCTION_WORDS
            + _VERBS
            + _NOUNS
            + _ADJECTIVES
        )
    )
    out.append(" ".join(vocab_words))
    out.append(" ".join(w.capitalize() for w in vocab_words))
    out.append("0 1 2 3 4 5 6 7 8 9 10 16 24 32 64 100 2024 . , ! ? : ; ' \" - ( ) [ ] < > / # * = + _ %")
    for _ in range(n_sentences):
        r = rng.random()
        if r < 0.35:  # plain captions, the project's synthetic data
            kind = rng.random()
            if kind < 0.45:
                s = obj()
            elif kind < 0.75:
                s = f"{obj()} {motion()}"
            else:
                s = snd()
            if rng.random() < 0.3:
                s = s[0].upper() + s[1:] + "."
        elif r < 0.7:  # Vicuna v0 conversation turns
            s = f"### Human: {fill(pick(_INSTRUCTIONS))}\n### Assistant: {fill(pick(_ANSWERS))}\n###"
        elif r < 0.85:
            s = f"{pick(['A', 'The', 'This', 'One'])} {pick(_MEDIA)} of {obj()}."
        else:
            s = filler()
        out.append(s)
    return out


def caption_conversations(rng: random.Random, n: int) -> list[str]:
    """Vicuna-v0 turns whose answers are captions of the project's synthetic grammar.

    Why: the real Vicuna has read plenty of text like CC3M captions; the tiny one reads these.
    Media placeholders are left out (the base tokenizer has no <Img> token, like Vicuna's).
    """

    def caption() -> str:
        kind = rng.random()
        if kind < 0.4:
            shapes = [
                (rng.choice(list(syn.COLOURS)), rng.choice(syn.SHAPES), rng.choice(list(syn.POSITIONS)))
            ]
            return syn.image_caption(shapes, rng.choice(list(syn.BACKGROUNDS)))
        if kind < 0.7:
            return syn.audio_caption(
                rng.choice(list(syn.LOUDNESS)), rng.choice(list(syn.PITCHES)), rng.choice(syn.PATTERNS)
            )
        return syn.video_caption(rng.choice(list(syn.COLOURS)), rng.choice(list(syn.DIRECTIONS)))

    out = []
    for _ in range(n):
        m = rng.choice(("image", "audio", "video"))
        if rng.random() < 0.5:
            q = rng.choice(syn.COMPREHENSION_INSTRUCTIONS).format(m=m)
            out.append(f"### Human: {q}\n### Assistant: {caption()}\n###")
        else:
            q = rng.choice(syn.GENERATION_REQUESTS).format(n=rng.choice(syn.GENERATION_NOUNS[m]), c=caption())
            a = rng.choice(syn.GENERATION_ANSWERS).format(m=m).replace(f"<{m}>", "").strip()
            out.append(f"### Human: {q}\n### Assistant: {a}\n###")
    return out
