-- Extra objects for the facts corpus, created beside the demo tables in a database of
-- their own. Keep this small: each object earns its place by a corpus case that needs it.
CREATE VIEW customer_countries AS SELECT id, country FROM customers;
CREATE TABLE "MixedCase" ("Id" integer PRIMARY KEY, "Secret Value" text);
CREATE SCHEMA hidden;
CREATE TABLE hidden.vault (id integer, payload text);
