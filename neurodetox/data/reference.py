"""Held-out general English text for perplexity checks (damage to general ability).

Plain everyday prose on varied topics, written for this project, with no
GeoNames fact statements (capitals, continents, currencies), so a fine-tuning
run on the fact data never trains on it. Used by ``neurodetox experiment``
(perplexity per run) and available to ``neurodetox patch eval``.
"""

from __future__ import annotations

__all__ = ["REFERENCE_TEXTS"]

#: 40 sentences of general text, 10 to 30 words each.
REFERENCE_TEXTS: tuple[str, ...] = (
    "The kettle clicked off, and she poured the water slowly over the tea leaves before sitting down by the window.",
    "Most plants need sunlight, water and carbon dioxide to grow, and they release oxygen as a by-product.",
    "He forgot his umbrella at the station, so he walked home through the rain with his collar turned up.",
    "A good recipe lists the ingredients in the order they are used and explains each step in plain words.",
    "Children often learn to ride a bicycle by first practising balance on a small bike without pedals.",
    "The library extended its opening hours during the exam period, and the reading rooms were full every evening.",
    "To change a flat tyre, loosen the nuts slightly before lifting the car with the jack.",
    "The orchestra tuned their instruments while the audience found their seats and the lights slowly dimmed.",
    "Bread rises because yeast feeds on sugar and produces small bubbles of gas that are trapped in the dough.",
    "After the storm, the neighbours worked together to clear the fallen branches from the road.",
    "A computer program is a set of instructions that tells the machine what to do, one step at a time.",
    "The museum's new exhibition shows how everyday tools have changed over the last two hundred years.",
    "She kept a small notebook in her bag and wrote down ideas whenever they came to her.",
    "Regular exercise, enough sleep and a balanced diet help most people stay healthy as they grow older.",
    "The train was delayed by twenty minutes because of a signal problem further down the line.",
    "Honey bees visit thousands of flowers to collect nectar, which they turn into honey inside the hive.",
    "When you write an email to a colleague, a clear subject line saves everyone time.",
    "The old bridge was closed for repairs, so drivers had to take a longer route along the river.",
    "Learning a new language is easier when you practise a little every day rather than a lot once a week.",
    "The cat jumped onto the table, knocked over a glass of water and ran out of the room.",
    "Farmers rotate their crops so that the soil does not lose the same nutrients year after year.",
    "The teacher asked the class to read the first chapter and write a short summary for the next lesson.",
    "Snow fell all night, and in the morning the whole street was quiet and white.",
    "A map is only useful if you know where you are on it and which way is north.",
    "The shop around the corner sells fresh vegetables, bread and newspapers, and it opens early every day.",
    "Scientists repeat their experiments several times to make sure the results are not due to chance.",
    "He practised the piano for an hour each evening, starting with scales before playing the pieces he liked.",
    "Good sleep helps the brain store what it has learned during the day.",
    "The hikers checked the weather forecast, packed extra water and set off before sunrise.",
    "A strong password is long, hard to guess and different for every account you use.",
    "The children built a small wooden boat and watched it drift slowly across the pond.",
    "Cooking rice is simple: rinse it, add the right amount of water and let it simmer with the lid on.",
    "The meeting ran late because everyone wanted to discuss the new schedule in detail.",
    "Autumn leaves change colour as the trees stop producing the green pigment that captures sunlight.",
    "She repaired the broken chair with glue and a few screws, and it was as good as new.",
    "Many people enjoy reading a book before bed because it helps them relax after a busy day.",
    "The bus driver waited for the old man to sit down before pulling away from the stop.",
    "Writing clear instructions is harder than it looks, because the reader cannot ask you what you meant.",
    "The garden was full of tomatoes, beans and courgettes by the end of the summer.",
    "When the power went out, the family lit candles and played cards until it came back.",
)
