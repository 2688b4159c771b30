import { randomUUID } from 'node:crypto';
import type { Redis } from 'ioredis';
import type { Collection } from 'mongodb';
import type { Pool, PoolClient } from 'pg';

export interface Order {
  readonly id: string;
  readonly item: string;
  readonly amount: number;
  /** The idempotency key that created it (null for /create). */
  readonly key: string | null;
  readonly createdAt: string;
}

/**
 * Where orders live. It is the same backend as the idempotency store, so several demo processes
 * pointed at one database share one order list (and `GET /orders` counts executions across them).
 */
export interface OrderRepo {
  /** `tx`: the Postgres transaction of transactional mode, so the order commits with its stored response. */
  insert(order: Omit<Order, 'id' | 'createdAt'>, tx?: unknown): Promise<Order>;
  list(): Promise<Order[]>;
  /** The order a 201's `Location` names, or undefined. */
  get(id: string): Promise<Order | undefined>;
}

function newOrder(input: Omit<Order, 'id' | 'createdAt'>): Order {
  return { id: `ord_${randomUUID()}`, createdAt: new Date().toISOString(), ...input };
}

export function memoryOrders(): OrderRepo {
  const orders: Order[] = [];
  return {
    async insert(input) {
      const order = newOrder(input);
      orders.push(order);
      return order;
    },
    async list() {
      return [...orders];
    },
    async get(id) {
      return orders.find((o) => o.id === id);
    },
  };
}

interface OrderRow { id: string; item: string; amount: number; idem_key: string | null; created_at: Date }
const fromRow = (r: OrderRow): Order => ({ id: r.id, item: r.item, amount: r.amount, key: r.idem_key, createdAt: r.created_at.toISOString() });

export async function postgresOrders(pool: Pool, namespace: string): Promise<OrderRepo> {
  const table = `${namespace}_orders`;
  await pool.query(`CREATE TABLE IF NOT EXISTS ${table} (
    id text PRIMARY KEY, item text NOT NULL, amount integer NOT NULL, idem_key text,
    created_at timestamptz NOT NULL DEFAULT now())`).catch(async (error: { code?: string }) => {
    // Several demo processes starting at once may race on CREATE TABLE; the loser sees 23505,
    // 42P07, or 42710 (its row type "already exists": seen in CI with three processes).
    if (error.code !== '23505' && error.code !== '42P07' && error.code !== '42710') throw error;
  });
  return {
    async insert(input, tx) {
      const order = newOrder(input);
      const db = (tx as PoolClient | undefined) ?? pool;
      await db.query(`INSERT INTO ${table} (id, item, amount, idem_key, created_at) VALUES ($1, $2, $3, $4, $5)`, [
        order.id, order.item, order.amount, order.key, order.createdAt,
      ]);
      return order;
    },
    async list() {
      const { rows } = await pool.query<OrderRow>(
        `SELECT id, item, amount, idem_key, created_at FROM ${table} ORDER BY created_at, id`,
      );
      return rows.map(fromRow);
    },
    async get(id) {
      const { rows } = await pool.query<OrderRow>(`SELECT id, item, amount, idem_key, created_at FROM ${table} WHERE id = $1`, [id]);
      return rows[0] && fromRow(rows[0]);
    },
  };
}

export function redisOrders(redis: Redis, namespace: string): OrderRepo {
  const key = `${namespace}:orders`;
  return {
    async insert(input) {
      const order = newOrder(input);
      await redis.rpush(key, JSON.stringify(order));
      return order;
    },
    async list() {
      return (await redis.lrange(key, 0, -1)).map((s) => JSON.parse(s) as Order);
    },
    async get(id) {
      // A list, scanned: fine for a demo.
      return (await redis.lrange(key, 0, -1)).map((s) => JSON.parse(s) as Order).find((o) => o.id === id);
    },
  };
}

export function mongoOrders(collection: Collection<Order & { _id?: unknown }>): OrderRepo {
  return {
    async insert(input) {
      const order = newOrder(input);
      await collection.insertOne({ ...order });
      return order;
    },
    async list() {
      const docs = await collection.find({}, { projection: { _id: 0 } }).sort({ createdAt: 1 }).toArray();
      return docs.map(({ id, item, amount, key, createdAt }) => ({ id, item, amount, key, createdAt }));
    },
    async get(id) {
      const doc = await collection.findOne({ id }, { projection: { _id: 0 } });
      return doc ? { id: doc.id, item: doc.item, amount: doc.amount, key: doc.key, createdAt: doc.createdAt } : undefined;
    },
  };
}
