"""Held-out value lists of the memory app: names and attribute values that the training generator never draws.

The *novel* evaluation set (``build_data.py --novel N``, ``eval_novel.jsonl``) asks about people made only of
these: first and last names outside both halves of ``memory.names`` (so neither training nor OOD people carry
them; short ones like "Bo Od", long and hyphenated ones like "Wilhelmina Fitzgerald-Hayes", rare letter patterns),
and cities, occupations, universities and birth dates (1900-1939 and 2006-2024) outside the training value lists.
An in-tool model answers them right only by copying what the database returns: neither the name nor the value was
ever a string it could memorise. Disjointness from the training lists is tested.
"""

NOVEL_FIRST_NAMES: tuple[str, ...] = (
    "Bo", "Ai", "Ty", "Jo", "Eun", "Yrsa", "Tjark", "Oisin", "Eoghan", "Xiomara", "Quetzalli", "Zbigniew", "Njoki",
    "Chidi", "Kgosi", "Thandiwe", "Aigerim", "Nurlan", "Bolat", "Dilnoza", "Farrukh", "Gulnara", "Ikaika", "Mahina",
    "Anahera", "Yatziri", "Itzel", "Tenoch", "Citlali", "Ruadhan", "Caoimhe", "Grainne", "Dervla", "Lachlan", "Ailsa",
    "Fenella", "Ottoline", "Peregrine", "Barnaby", "Crispin", "Tarquin", "Maximiliana", "Konstantina", "Evangelina",
    "Bartholomew", "Wilhelmina", "Jean-Baptiste", "Karl-Heinz", "Hans-Peter", "Mary-Kate", "Ua", "Ox", "Iz", "Yuzuru",
    "Haruki", "Hinata", "Jiwoo", "Eunji", "Anaisa", "Zuleika", "Orrin", "Thaddeus", "Ignatius", "Leopoldine",
    "Rosalind", "Ysolde", "Eluned", "Gwilym",
)

NOVEL_LAST_NAMES: tuple[str, ...] = (
    "Yi", "Od", "Kamau", "Szczepanski", "Brzezinski", "Przybylski", "Vanderschoot", "Van-Houten", "De-Vries",
    "McAllister", "Fitzgerald-Hayes", "Ruiz-Tagle", "Ortiz-Mena", "Konstantinopoulos", "Karamanlis", "Oyelowo",
    "Nwachukwu", "Tchaikovska", "Zhukovsky", "Yevtushenko", "Grzegorczyk", "Hrafnsdottir", "Sigurdsson",
    "Gudmundsdottir", "Thorvaldsen", "Kjaergaard", "Haugland", "Ekstrom", "Wahlberg", "Rautio", "Eskelinen",
    "Aldabra", "Quispe", "Mamani", "Huaman", "Condori", "Tupa", "Kahananui", "Tawhiri", "Ihimaera", "Bjornstad",
    "Aasen", "Rrapi", "Hoxha", "Berisha", "Krasniqi", "Zoric", "Vukovic", "Yilmazer", "Karakaya", "Demirci", "Qiu",
    "Zhuang", "Ouyang", "Situ", "Nasrallah", "Abboud", "Salazar-Quintero", "Mendoza-Ibarra",
)

NOVEL_CITIES: tuple[str, ...] = (
    "Ouagadougou", "Ulaanbaatar", "Thimphu", "Nuuk", "Tromso", "Hobart", "Ushuaia", "Timbuktu", "Samarkand",
    "Bukhara", "Asmara", "Windhoek", "Gaborone", "Maseru", "Apia", "Suva", "Honiara", "Port Vila", "Funafuti",
    "Majuro", "Palikir", "Iqaluit", "Yellowknife", "Whitehorse", "Kiruna", "Akureyri", "Lerwick", "Kirkwall",
    "Stornoway", "Dunedin", "Invercargill", "Alice Springs", "Broome", "Darwin", "Cairns", "Arequipa", "Cusco",
    "Potosi", "Sucre", "Valparaiso", "Puerto Montt", "Punta Arenas", "Iquitos", "Manaus", "Belem", "Cayenne",
    "Paramaribo", "Georgetown", "Nouakchott", "Bamako", "Niamey", "Ndjamena", "Bangui", "Juba", "Djibouti",
    "Mogadishu", "Moroni", "Victoria Falls", "Lubumbashi", "Kisangani", "Zanzibar City", "Antananarivo", "Toamasina",
    "Saint-Denis", "Port Louis", "Male", "Paro", "Leh", "Shillong", "Aizawl", "Imphal", "Kohima",
)

NOVEL_OCCUPATIONS: tuple[str, ...] = (
    "glassblower", "luthier", "farrier", "taxidermist", "cooper", "wheelwright", "chandler", "falconer", "beekeeper",
    "clockmaker", "bookbinder", "stonemason", "thatcher", "saddler", "tanner", "weaver", "perfumer", "puppeteer",
    "lighthouse keeper", "sheep shearer", "ice sculptor", "organ builder", "bell founder", "tea blender",
    "kite maker", "harbour pilot", "lift engineer", "fire lookout", "gem cutter", "piano tuner", "cheesemaker",
    "rope maker", "sail maker", "tide gauge keeper", "mapmaker",
)

NOVEL_UNIVERSITIES: tuple[str, ...] = (
    "University of Reykjavik", "University of Tromso", "Aberystwyth University", "University of the Highlands",
    "Lincoln University of Canterbury", "University of Otago", "Charles Darwin University", "University of Tasmania",
    "Universidad de Magallanes", "Universidad de Cusco", "University of Namibia", "University of Botswana",
    "National University of Mongolia", "Tbilisi State University", "Yerevan State University",
    "University of Iceland", "University of the South Pacific", "University of Greenland",
    "Memorial University of Newfoundland", "Lakehead University", "University of Lapland", "Abo Akademi University",
    "University of Zanzibar", "University of Nouakchott", "Royal University of Bhutan", "University of Guyana",
    "Anton de Kom University", "University of Malta", "University of the Faroe Islands", "Universite de la Reunion",
)
