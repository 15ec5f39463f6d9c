"""A built-in, seeded generator of varied text-to-image prompts for calibration (``rflow analyze``).

Statistics that decide which MLP units a compressed model keeps must come from prompts like the ones
people give the model: many subjects (people, animals, objects, places, food, vehicles, plants,
fantasy), many styles (photo, oil painting, watercolour, 3D render, pixel art, anime, line drawing…),
compositions, lighting and time of day, and about one prompt in five asks for quoted text to be
rendered (signs, posters, labels). The prompts are written the way FLUX.1 users write them: a
descriptive sentence with comma-separated qualifiers.

``calibration_prompts(n, seed)`` is deterministic (it only uses ``random.Random.random``, whose stream
Python keeps stable across versions), prefix-stable (the first ``k`` prompts of ``n`` equal
``calibration_prompts(k, seed)``) and returns distinct prompts.
"""

from __future__ import annotations

import random

TEXT_SHARE = 0.2  # share of prompts that ask for quoted text

PEOPLE = [
    "an elderly fisherman", "a young ballerina", "a street musician", "a tired nurse", "an astronaut",
    "a medieval knight", "a chef in a white apron", "a little girl in a yellow raincoat", "a skateboarder",
    "an old woman knitting", "a samurai", "a jazz trumpeter", "a farmer", "a scientist in a lab coat",
    "a grandfather reading a newspaper", "a surfer", "a beekeeper", "a boxer", "a flamenco dancer",
    "a blacksmith", "a librarian", "a mountain climber", "a street vendor", "a bride", "a detective in a trench coat",
    "a teenage gamer", "a potter at her wheel", "a violinist", "a firefighter", "a shepherd",
    "a Victorian gentleman", "a punk rocker with a green mohawk", "a tattoo artist", "a painter at an easel",
    "twin brothers", "a group of friends", "a marathon runner", "a monk in orange robes", "a cowboy",
    "a diver", "a pilot", "a baker", "a gardener", "a DJ", "a yoga instructor", "a toddler",
]
ANIMALS = [
    "a red fox", "a snow leopard", "a golden retriever", "a tabby cat", "a barn owl", "a humpback whale",
    "a hummingbird", "an elephant", "a panda", "a chameleon", "a hedgehog", "a wolf", "a peacock",
    "a sea turtle", "a corgi", "a koala", "a raccoon", "a flamingo", "a polar bear", "a tiger",
    "a jellyfish", "a horse", "a rabbit", "an octopus", "a giraffe", "a penguin", "a parrot", "a frog",
    "a deer", "a lion", "a monarch butterfly", "a goldfish", "a squirrel", "a black cat", "a bulldog",
    "a dragonfly", "a sloth", "an axolotl", "a crow", "a highland cow", "a lynx", "an otter",
]
OBJECTS = [
    "a vintage typewriter", "a pocket watch", "a pair of red sneakers", "a glass teapot", "an old camera",
    "a stack of books", "a violin", "a chess set", "a lantern", "a globe", "a bicycle helmet", "a ceramic vase",
    "a wooden chair", "a mechanical keyboard", "a perfume bottle", "a leather backpack", "an hourglass",
    "a music box", "a rubber duck", "a telescope", "a snow globe", "a retro radio", "a compass", "a candle",
    "a pair of glasses", "a crystal ball", "a sword", "a teddy bear", "a smartphone", "a paper boat",
    "a potted cactus", "a record player", "a diamond ring", "a robot toy", "an umbrella", "a skull",
    "a chandelier", "a fountain pen", "a guitar", "a treasure chest", "a sneaker", "a wristwatch",
]
PLACES = [
    "a lighthouse", "a Japanese temple", "a cozy cabin", "a futuristic city", "a medieval castle",
    "an abandoned factory", "a floating island", "a desert oasis", "a Parisian café", "a neon-lit alley",
    "a greenhouse", "a subway station", "a mountain village", "a tropical beach", "a library with tall shelves",
    "a space station", "a rooftop garden", "a frozen lake", "a bamboo forest", "a canyon", "a harbour",
    "a night market", "a cathedral", "a waterfall", "a lavender field", "a volcano", "a small bakery",
    "a train platform", "a ruined temple", "a laundromat", "a cyberpunk street", "a windmill", "a coral reef",
    "a cottage", "a diner", "an observatory", "a skyscraper", "a vineyard", "a snowy mountain pass", "a swamp",
]
FOOD = [
    "a bowl of ramen", "a stack of pancakes", "a slice of pepperoni pizza", "a sushi platter", "a chocolate cake",
    "a croissant", "a cup of cappuccino", "a burger with fries", "a bowl of fresh berries", "a taco",
    "a glass of red wine", "a loaf of sourdough bread", "a plate of spaghetti", "a fruit tart", "dumplings",
    "a milkshake", "a cheese board", "macarons", "a watermelon", "a bowl of pho", "an ice cream cone",
    "a cup of matcha", "a bagel", "a pumpkin pie", "a cocktail", "a plate of paella", "donuts", "a pineapple",
    "a lemon", "a cinnamon roll", "a bento box", "a bowl of salad", "a lobster", "a jar of honey",
]
VEHICLES = [
    "a vintage red convertible", "a steam locomotive", "a sailboat", "a hot air balloon", "a motorcycle",
    "a yellow taxi", "a double-decker bus", "a vintage biplane", "a pickup truck", "a submarine", "a tram",
    "a racing car", "a camper van", "a spaceship", "a fishing boat", "a tractor", "a cable car", "a scooter",
    "a fire truck", "a gondola", "a zeppelin", "a rowing boat", "a helicopter", "a monster truck",
    "an ice cream truck", "a tuk-tuk", "a classic Vespa", "a cargo ship", "a rusty old car", "a canoe",
]
PLANTS_AND_FANTASY = [
    "a cherry blossom tree", "a giant mushroom", "a sunflower", "a bonsai tree", "a dragon", "a unicorn",
    "a phoenix", "a friendly robot", "a wizard", "a mermaid", "an elf archer", "a tiny fairy", "a golem",
    "a ghost", "a griffin", "a steampunk automaton", "an alien", "a witch on a broom", "a troll", "a kraken",
    "a tree house", "a field of tulips", "an ancient oak", "a water lily", "a carnivorous plant", "a cactus",
    "a vampire", "a centaur", "a knight's armour", "a giant snail",
]
SUBJECTS = [PEOPLE, ANIMALS, OBJECTS, PLACES, FOOD, VEHICLES, PLANTS_AND_FANTASY]

ACTIONS = {
    id(PEOPLE): [
        "laughing", "looking at the camera", "walking in the rain", "reading a book", "dancing", "sitting on a bench",
        "holding a cup of coffee", "playing the guitar", "riding a bicycle", "lost in thought", "waving",
        "carrying groceries", "painting a mural", "sleeping", "running", "eating noodles", "talking on the phone",
    ],
    id(ANIMALS): [
        "sleeping", "running through", "curled up", "wearing a tiny hat", "looking up", "jumping", "yawning",
        "sitting", "playing with a ball of yarn", "swimming", "hunting", "eating", "peeking out",
        "wearing sunglasses", "perched", "in mid-flight", "drinking water",
    ],
}

SETTINGS = [
    "in a snowy forest", "on a busy city street", "on a wooden pier", "in a sunlit meadow", "on the surface of the moon",
    "in an underwater cave", "on a kitchen table", "in a foggy harbour", "at the edge of a cliff", "in a rainy alley",
    "in a field of wildflowers", "on a rooftop at night", "inside a cozy living room", "in the desert", "on a beach",
    "in an ancient library", "in a neon-lit arcade", "on a mountain top", "in a bamboo forest", "in a cluttered workshop",
    "on a marble pedestal", "against a plain white background", "in a museum", "in outer space", "at a train station",
    "in a flower shop", "in a jungle", "on a frozen lake", "in a field of lavender", "in a steampunk laboratory",
    "on a windowsill", "in a small Italian village", "at a night market", "in a misty valley", "in a greenhouse",
    "on an old wooden table", "in a cyberpunk city", "in a medieval tavern", "under a cherry blossom tree",
    "on a rainy window ledge", "in a subway car", "on a sandy dune", "in a dark cave lit by crystals",
]
STYLES = [
    "a photo", "a close-up photograph", "an oil painting", "a watercolour painting", "a 3D render", "pixel art",
    "an anime illustration", "a line drawing", "a pencil sketch", "a charcoal drawing", "a vintage photograph",
    "a polaroid photo", "a studio photograph", "a cinematic still", "a digital painting", "concept art",
    "a claymation still", "a low-poly render", "an isometric illustration", "a children's book illustration",
    "a comic book panel", "an ukiyo-e woodblock print", "a stained glass window", "a vector illustration",
    "a gouache painting", "an impressionist painting", "a pop art poster", "a linocut print", "a mosaic",
    "a paper cut-out collage", "a tilt-shift photo", "a double exposure photo", "a neon art piece",
    "a Renaissance painting", "a cel-shaded illustration", "a sticker design", "an embroidery",
    "a black and white photograph", "a macro photograph", "a product shot", "a fashion editorial photo",
]
STYLE_TAILS = [
    "highly detailed", "8k", "sharp focus", "film grain", "shot on 35mm film", "85mm lens", "shallow depth of field",
    "bokeh", "octane render", "unreal engine", "trending on artstation", "soft pastel colours", "muted palette",
    "vibrant colours", "high contrast", "minimalist", "intricate details", "thick brush strokes",
    "loose brushwork", "clean lines", "flat colours", "retro 1970s style", "art nouveau style", "studio ghibli style",
    "baroque style", "art deco style", "hyperrealistic", "dreamy atmosphere", "moody", "whimsical",
    "award-winning photograph", "volumetric light", "long exposure", "kodak portra 400", "monochrome",
    "symmetrical composition", "rule of thirds", "grainy texture", "glossy finish", "matte finish",
]
COMPOSITIONS = [
    "close-up", "extreme close-up", "wide shot", "aerial view", "portrait", "still life", "full body shot",
    "bird's-eye view", "low-angle shot", "over-the-shoulder shot", "macro shot", "panoramic view", "top-down view",
    "side view", "three-quarter view", "silhouette", "medium shot", "establishing shot", "flat lay",
    "fisheye view", "centered composition", "dutch angle",
]
LIGHTING = [
    "at golden hour", "at sunrise", "at sunset", "at dusk", "at night", "at noon", "under a full moon",
    "in soft morning light", "in harsh midday sun", "with dramatic rim lighting", "with neon lighting",
    "lit by candlelight", "under overcast skies", "in dappled sunlight", "during a thunderstorm", "in thick fog",
    "in the blue hour", "with studio lighting", "backlit", "with volumetric god rays", "in winter light",
    "under string lights", "by firelight", "in autumn", "in spring", "during heavy snowfall", "in the rain",
    "with cinematic lighting", "in warm lamplight", "under fluorescent lights", "with soft diffused light",
]
COLOURS = [
    "red", "blue", "emerald green", "golden", "silver", "pastel pink", "teal", "orange", "purple", "black",
    "white", "turquoise", "crimson", "mustard yellow", "navy", "copper", "lavender", "rusty", "ivory", "neon green",
]
# Quoted text people ask FLUX to render: short words and phrases.
TEXT_WORDS = [
    "OPEN", "HELLO", "CAFE", "Good Vibes", "SALE", "STOP", "HOTEL", "Fresh Bread", "WELCOME", "NO PARKING",
    "Coffee", "LOVE", "EXIT", "Happy Birthday", "DREAM BIG", "PIZZA", "Bakery", "GAME OVER", "Stay Wild",
    "TOKYO", "Paris", "Be Kind", "BOOKS", "SUSHI", "Jazz Night", "FOR RENT", "Hello World", "TACOS",
    "RAMEN", "Keep Calm", "THE END", "MOTEL", "ARCADE", "Tea Time", "Summer", "SPACE", "RFLOW", "Lemonade",
    "Gym", "FLOWERS", "Vinyl", "ROCK ON", "Dream", "24/7", "Good Morning", "CLOSED", "DANGER", "PEACE",
    "Café du Monde", "LIVE MUSIC", "Est. 1987", "Hot Dogs", "ICE COLD", "No. 9", "NEW YORK", "Thank You",
    "Mars", "EAT", "Bon Voyage", "LAUNDRY",
]
TEXT_CARRIERS = [
    'a neon sign that says "{t}"', 'a wooden sign that reads "{t}"', 'a vintage travel poster with the words "{t}"',
    'a coffee cup with "{t}" written on it', 'a chalkboard menu that says "{t}"', 'a book cover titled "{t}"',
    'a T-shirt printed with the word "{t}"', 'a storefront with "{t}" painted on the window',
    'a graffiti mural spelling "{t}"', 'a birthday cake with "{t}" written in icing', 'a jar with a label reading "{t}"',
    'a movie poster titled "{t}"', 'a street sign that reads "{t}"', 'a billboard with the text "{t}"',
    'a handwritten note that says "{t}"', 'a license plate that reads "{t}"', 'a cardboard sign saying "{t}"',
    'a tote bag with "{t}" printed on it', 'a banner reading "{t}"', 'a cereal box labelled "{t}"',
    'a doormat that says "{t}"', 'a tattoo of the word "{t}"', 'a retro video game screen showing "{t}"',
    'a rubber stamp imprint reading "{t}"', 'a sand drawing of the word "{t}"', 'a letter board that says "{t}"',
    'a wine bottle with a label reading "{t}"', 'a mug that says "{t}"', 'a protest sign reading "{t}"',
    'a cookie with "{t}" piped in frosting',
]
TEXT_STYLES = [
    "in bold art deco letters", "in elegant gold script", "in hand-painted letters", "in glowing pink neon",
    "in chunky 3D letters", "in a retro typeface", "in clean sans-serif type", "in chalk lettering",
    "in dripping paint", "in pixel font",
]


def _pick(rng: random.Random, items: list):
    return items[int(rng.random() * len(items))]


def _subject(rng: random.Random) -> str:
    group = _pick(rng, SUBJECTS)
    s = _pick(rng, group)
    if group is OBJECTS or group is VEHICLES:
        if rng.random() < 0.4 and " of " not in s:  # "a vintage typewriter" -> "a teal vintage typewriter"
            colour = _pick(rng, COLOURS)
            s = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {s.split(' ', 1)[1]}"
    actions = ACTIONS.get(id(group))
    if actions and rng.random() < 0.6:
        s = f"{s} {_pick(rng, actions)}"
    return s


def _text_subject(rng: random.Random) -> str:
    s = _pick(rng, TEXT_CARRIERS).format(t=_pick(rng, TEXT_WORDS))
    if rng.random() < 0.5:
        s = f"{s} {_pick(rng, TEXT_STYLES)}"
    return s


def _tails(rng: random.Random, k: int) -> str:
    picked: list[str] = []
    while len(picked) < k:
        t = _pick(rng, STYLE_TAILS)
        if t not in picked:
            picked.append(t)
    return ", ".join(picked)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _prompt(rng: random.Random) -> str:
    text = rng.random() < TEXT_SHARE
    subject = _text_subject(rng) if text else _subject(rng)
    setting = _pick(rng, SETTINGS)
    style = _pick(rng, STYLES)
    comp = _pick(rng, COMPOSITIONS)
    light = _pick(rng, LIGHTING)
    tails = _tails(rng, 1 + int(rng.random() * 3))
    form = int(rng.random() * 5)
    if form == 0:  # "An oil painting of a red fox sleeping in a snowy forest, close-up, at dusk, moody"
        return f"{_cap(style)} of {subject} {setting}, {comp}, {light}, {tails}"
    if form == 1:  # "Wide shot of a lighthouse on a beach at sunset, a photo, film grain"
        return f"{_cap(comp)} of {subject} {setting} {light}, {style}, {tails}"
    if form == 2:  # "A tabby cat on a windowsill. Soft morning light. Watercolour painting, muted palette."
        return f"{_cap(subject)} {setting}. {_cap(light)}. {_cap(style)}, {comp}, {tails}."
    if form == 3:  # short, as many people type
        return f"{subject} {setting}, {style}"
    return f"{_cap(subject)} {setting} {light}, {comp}, {style}, {tails}"


def calibration_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` varied text-to-image prompts, the same for the same ``seed``; duplicates are redrawn, so
    they are distinct for any practical ``n`` (the generator spans far more than 10⁹ prompts)."""
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        for _ in range(100):  # retry duplicates; the space is large, so this almost never loops
            p = _prompt(rng)
            if p not in seen:
                break
        seen.add(p)
        out.append(p)
    return out
